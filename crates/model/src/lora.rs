//! LoRA: the adapter settings, and `LoraLinear`, a frozen linear plus low-rank updates.
//!
//! y = x W^T + b + scaling * dropout(x) A^T B^T, with A (r, in) Kaiming-uniform and B (rows, r)
//! zero, scaling = alpha / r. An adapter covers a contiguous block of output rows: the whole
//! output for ordinary linears, or the Q, K or V block of the fused qkv projection (stored as
//! [Q | K | V]), so enabling "query" touches exactly the query rows for MHA, GQA and MQA alike.
//! Several adapters on one linear share one dropout mask and run as two skinny matmuls:
//! (x @ [A_1; A_2]^T) @ B_block^T, where B_block places each B_i at its rows and columns.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ops::activation::{gelu_erf, gelu_erf_backward, swiglu, swiglu_backward};
use crate::ops::linear::{
    frozen_forward, frozen_linear_add, gelu_then_frozen_linear, linear_input_grad,
    swiglu_then_frozen_linear,
};
use crate::ops::{recompute, Backend};
use crate::quant::{QuantKind, QuantWeight};
use crate::rng::Rng;

/// Which linears get adapters. Lit-GPT's default is query and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraTargets {
    pub query: bool,
    pub key: bool,
    pub value: bool,
    pub projection: bool,
    pub mlp: bool,
    pub head: bool,
}

impl Default for LoraTargets {
    fn default() -> Self {
        LoraTargets {
            query: true,
            key: false,
            value: true,
            projection: false,
            mlp: false,
            head: false,
        }
    }
}

impl LoraTargets {
    /// Names of the enabled targets, in a fixed order.
    pub fn names(&self) -> Vec<&'static str> {
        [
            ("query", self.query),
            ("key", self.key),
            ("value", self.value),
            ("projection", self.projection),
            ("mlp", self.mlp),
            ("head", self.head),
        ]
        .into_iter()
        .filter_map(|(n, on)| on.then_some(n))
        .collect()
    }

    pub fn any(&self) -> bool {
        !self.names().is_empty()
    }
}

/// LoRA hyperparameters. Saved with every adapter checkpoint so generation never has to be
/// told them again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: LoraTargets,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: LoraTargets::default(),
        }
    }
}

/// The largest accepted scaling alpha / r: far above any published recipe (1 to 64), and low
/// enough that a mistyped alpha is refused instead of generating from overflowed weights.
pub const MAX_SCALING: f64 = 1e4;

impl std::fmt::Display for LoraConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "r {}, alpha {}, dropout {}, targets {}",
            self.r,
            self.alpha,
            self.dropout,
            self.targets.names().join("+")
        )
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        self.alpha / self.r as f64
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Lora("rank r must be at least 1".into()));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::Lora(format!(
                "alpha must be a positive number, got {}",
                self.alpha
            )));
        }
        if self.scaling() > MAX_SCALING {
            return Err(Error::Lora(format!(
                "alpha / r = {} / {} = {:e} is above {MAX_SCALING:e}; the adapted weights would \
                 overflow",
                self.alpha,
                self.r,
                self.scaling()
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Lora(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if !self.targets.any() {
            return Err(Error::Lora(
                "no target enabled (query, key, value, projection, mlp, head)".into(),
            ));
        }
        Ok(())
    }
}

thread_local! {
    static NO_GRAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every adapter read as a constant, so nothing it computes is tracked for
/// autograd: evaluation and generation. Without it a model with adapters records a graph of
/// every op (and keeps every activation alive) for a backward pass that never comes, and
/// misses the fused inference kernels.
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            NO_GRAD.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(NO_GRAD.with(|c| c.replace(true)));
    f()
}

/// An adapter parameter as the forward pass reads it.
fn param(v: &Var) -> Tensor {
    if NO_GRAD.with(|c| c.get()) {
        v.as_tensor().detach()
    } else {
        v.as_tensor().clone()
    }
}

/// Per-call options for the training forward pass.
pub struct DropoutCtx<'a> {
    /// Draws the LoRA dropout masks.
    pub rng: &'a mut Rng,
    /// This forward is activation checkpointing's recomputation of a block: its output is
    /// only differentiated, never read, so products that go straight into it may skip their
    /// value (their backward is unchanged). `false` everywhere else.
    pub recompute: bool,
}

impl<'a> DropoutCtx<'a> {
    /// A training forward's options: masks drawn from `rng`.
    pub fn new(rng: &'a mut Rng) -> DropoutCtx<'a> {
        DropoutCtx {
            rng,
            recompute: false,
        }
    }
}

/// One low-rank update on a block of output rows.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Suffix of the parameter names ("" for a whole linear, "query"/"key"/"value" for qkv).
    pub target: &'static str,
    pub rows: Range<usize>,
    pub a: Var,
    pub b: Var,
}

/// A linear's frozen weight (out, in): a dense tensor, or quantized ggml blocks (QLoRA).
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    Dense(Tensor),
    Quantized(Arc<QuantWeight>),
}

impl FrozenWeight {
    /// (out, in).
    pub fn dims(&self) -> (usize, usize) {
        match self {
            FrozenWeight::Dense(w) => {
                let d = w.dims();
                (d[0], d[1])
            }
            FrozenWeight::Quantized(q) => (q.rows(), q.cols()),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            FrozenWeight::Dense(w) => w.device().clone(),
            FrozenWeight::Quantized(q) => q.device(),
        }
    }

    /// The dense tensor, `None` when quantized.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            FrozenWeight::Dense(w) => Some(w),
            FrozenWeight::Quantized(_) => None,
        }
    }

    /// The quantized blocks, `None` when dense.
    pub fn as_quantized(&self) -> Option<&Arc<QuantWeight>> {
        match self {
            FrozenWeight::Dense(_) => None,
            FrozenWeight::Quantized(q) => Some(q),
        }
    }

    /// Rows `ids` (a 1-D u32 tensor) of the matrix, an embedding lookup: dense rows as
    /// stored, quantized rows dequantized one by one to f32.
    pub fn select_rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => Ok(w.index_select(ids, 0)?),
            FrozenWeight::Quantized(q) => q.gather_rows(&ids.to_vec1::<u32>()?),
        }
    }

    /// Whether both are the same weight (one tensor or one set of blocks, not equal values).
    pub fn is(&self, other: &FrozenWeight) -> bool {
        match (self, other) {
            (FrozenWeight::Dense(a), FrozenWeight::Dense(b)) => a.id() == b.id(),
            (FrozenWeight::Quantized(a), FrozenWeight::Quantized(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// The matrix as a dense tensor: itself, or dequantized to `dtype` (merging, export).
    pub fn to_dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => Ok(w.clone()),
            FrozenWeight::Quantized(q) => q.dequantize(dtype),
        }
    }

    /// x W^T + b with no graph (inside a hand-written op), in x's dtype.
    pub fn forward_no_grad(
        &self,
        be: Backend,
        x: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => frozen_forward(be, x, w, bias),
            FrozenWeight::Quantized(q) => {
                let y = q.matmul_no_grad(x).map_err(candle_err)?;
                match bias {
                    Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
                    None => Ok(y),
                }
            }
        }
    }

    /// dY @ W, the input gradient (no graph).
    pub fn input_grad(&self, be: Backend, dy: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => linear_input_grad(be, dy, w),
            FrozenWeight::Quantized(q) => q.input_grad(dy).map_err(candle_err),
        }
    }
}

fn candle_err(e: Error) -> candle_core::Error {
    match e {
        Error::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

/// A frozen linear layer, optionally with LoRA adapters.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// Parameter-name prefix, e.g. `transformer.h.0.attn.qkv`.
    pub name: String,
    weight: FrozenWeight,
    pub bias: Option<Tensor>,
    adapters: Vec<Adapter>,
    scaling: f64,
    dropout: f64,
}

impl LoraLinear {
    /// A frozen linear with no adapters. `weight` is (out, in).
    pub fn frozen(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> LoraLinear {
        Self::with_weight(name, FrozenWeight::Dense(weight), bias)
    }

    /// A frozen linear over any weight (dense or quantized), with no adapters.
    pub fn with_weight(
        name: impl Into<String>,
        weight: FrozenWeight,
        bias: Option<Tensor>,
    ) -> LoraLinear {
        LoraLinear {
            name: name.into(),
            weight,
            bias,
            adapters: Vec::new(),
            scaling: 1.0,
            dropout: 0.0,
        }
    }

    pub fn weight(&self) -> &FrozenWeight {
        &self.weight
    }

    /// The dense weight; `None` when quantized.
    pub fn dense_weight(&self) -> Option<&Tensor> {
        self.weight.as_dense()
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims().1
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims().0
    }

    pub fn adapters(&self) -> &[Adapter] {
        &self.adapters
    }

    /// Adapter parameters are f32 whatever the weight dtype (bf16/f16 models train f32
    /// adapters), except for f64 models, whose adapters are f64 too.
    fn adapter_dtype(&self) -> DType {
        if self.dense_weight().map(Tensor::dtype) == Some(DType::F64) {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// Adds a freshly initialised adapter on `rows` of the output: A ~ U(-1/sqrt(in),
    /// 1/sqrt(in)) (Kaiming-uniform with a = sqrt(5), as PyTorch and Lit-GPT), B = 0.
    pub fn add_adapter(
        &mut self,
        target: &'static str,
        rows: Range<usize>,
        cfg: &LoraConfig,
        rng: &mut Rng,
    ) -> Result<()> {
        let (in_f, out_f) = (self.in_features(), self.out_features());
        if rows.end > out_f || rows.is_empty() {
            return Err(Error::Lora(format!(
                "{}: adapter rows {rows:?} outside the {out_f} output rows",
                self.name
            )));
        }
        let bound = 1.0 / (in_f as f32).sqrt();
        let a: Vec<f32> = (0..cfg.r * in_f)
            .map(|_| (rng.uniform() * 2.0 - 1.0) * bound)
            .collect();
        let device = self.weight.device();
        let a = Tensor::from_vec(a, (cfg.r, in_f), &device)?;
        let b = Tensor::zeros((rows.len(), cfg.r), DType::F32, &device)?;
        self.set_adapter(target, rows, a, b, cfg)
    }

    /// Installs an adapter with given A and B (from a checkpoint), checking their shapes.
    pub fn set_adapter(
        &mut self,
        target: &'static str,
        rows: Range<usize>,
        a: Tensor,
        b: Tensor,
        cfg: &LoraConfig,
    ) -> Result<()> {
        let in_f = self.in_features();
        let (a_name, b_name) = self.param_names(target);
        check_shape(&a_name, &a, &[cfg.r, in_f])?;
        check_shape(&b_name, &b, &[rows.len(), cfg.r])?;
        self.adapters.retain(|ad| ad.target != target);
        self.adapters.push(Adapter {
            target,
            rows,
            a: Var::from_tensor(&a.to_dtype(self.adapter_dtype())?)?,
            b: Var::from_tensor(&b.to_dtype(self.adapter_dtype())?)?,
        });
        self.scaling = cfg.scaling();
        self.dropout = cfg.dropout;
        Ok(())
    }

    /// Checkpoint names of an adapter's A and B.
    pub fn param_names(&self, target: &str) -> (String, String) {
        if target.is_empty() {
            (
                format!("{}.lora_A", self.name),
                format!("{}.lora_B", self.name),
            )
        } else {
            (
                format!("{}.lora_A.{target}", self.name),
                format!("{}.lora_B.{target}", self.name),
            )
        }
    }

    /// B placed at its rows, one column block per adapter: (out, n_adapters * r).
    fn b_block(&self) -> Result<Tensor> {
        let out_f = self.out_features();
        let device = &self.weight.device();
        let cols = self
            .adapters
            .iter()
            .map(|ad| {
                let b = param(&ad.b);
                let r = b.dims()[1];
                let mut parts = Vec::with_capacity(3);
                if ad.rows.start > 0 {
                    parts.push(Tensor::zeros((ad.rows.start, r), b.dtype(), device)?);
                }
                parts.push(b.clone());
                if ad.rows.end < out_f {
                    parts.push(Tensor::zeros((out_f - ad.rows.end, r), b.dtype(), device)?);
                }
                Tensor::cat(&parts, 0)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&cols, 1)?)
    }

    fn a_stack(&self) -> Result<Tensor> {
        let a: Vec<Tensor> = self.adapters.iter().map(|ad| param(&ad.a)).collect();
        Ok(Tensor::cat(&a, 0)?)
    }

    /// Forward pass. `dropout` is `Some` only in training; it draws the dropout mask.
    pub fn forward(
        &self,
        be: Backend,
        x: &Tensor,
        dropout: Option<&mut DropoutCtx>,
    ) -> Result<Tensor> {
        if self.adapters.is_empty() {
            return self.frozen_forward(be, x);
        }
        // The dropout mask is drawn from a seed and drawn again in the backward pass, so the
        // graph keeps neither the mask nor the dropped input; the low-rank update joins the
        // frozen product inside one op, so it keeps neither the full-width update nor a sum.
        // What stays per linear is x (shared) and the skinny (tokens, n_adapters * r) product.
        let mask = match dropout {
            Some(ctx) if self.dropout > 0.0 => Some((self.dropout, ctx.rng.next_u64())),
            _ => None,
        };
        let dtype = self.adapter_dtype();
        let scaling = self.scaling;
        let a = self.a_stack()?;
        let h = recompute(
            "lora-down",
            &[x, &a],
            |t| lora_down(&t[0], &t[1], scaling, mask, dtype),
            move |t, dh| {
                let (x, a) = (&t[0], &t[1]);
                let xd = dropped(x, mask, dtype)?;
                let dh = (dh.to_dtype(dtype)? * scaling)?;
                let rows = dh.elem_count() / dh.dim(D::Minus1)?;
                let dh2 = dh.reshape((rows, dh.dim(D::Minus1)?))?;
                let da = dh2.t()?.matmul(&xd.reshape((rows, xd.dim(D::Minus1)?))?)?;
                let mut dx = dh.broadcast_matmul(a)?;
                if let Some((p, seed)) = mask {
                    dx = dx.mul(&dropout_mask(x.dims(), p, seed, x.device())?.to_dtype(dtype)?)?;
                }
                Ok(vec![Some(dx), Some(da)])
            },
        )?;
        let (w, bias) = (self.weight.clone(), self.bias.clone());
        let b = self.b_block()?;
        Ok(recompute(
            "lora-up",
            &[x, &h, &b],
            |t| {
                let delta = t[1].broadcast_matmul(&t[2].t()?)?;
                let fused = match &w {
                    FrozenWeight::Dense(w) => {
                        frozen_linear_add(be, &t[0], w, bias.as_ref(), &delta)?
                    }
                    FrozenWeight::Quantized(_) => None,
                };
                match fused {
                    Some(y) => Ok(y),
                    None => {
                        let y = w.forward_no_grad(be, &t[0], bias.as_ref())?;
                        let delta = delta.to_dtype(y.dtype())?;
                        y + delta
                    }
                }
            },
            {
                let w = self.weight.clone();
                move |t, dy| {
                    let (h, b) = (&t[1], &t[2]);
                    let dx = w.input_grad(be, dy)?;
                    let dy = dy.to_dtype(h.dtype())?;
                    let dh = dy.broadcast_matmul(b)?;
                    let rows = dy.elem_count() / dy.dim(D::Minus1)?;
                    let db = dy
                        .reshape((rows, dy.dim(D::Minus1)?))?
                        .t()?
                        .matmul(&h.reshape((rows, h.dim(D::Minus1)?))?)?;
                    Ok(vec![Some(dx), Some(dh), Some(db)])
                }
            },
        )?)
    }

    /// `residual + this linear applied to gelu(x)`, as one op that keeps no activation (see
    /// `ops::linear::gelu_then_frozen_linear`); `None` if it has adapters or the op does not
    /// apply. With `value_unused` (activation checkpointing's recomputation, which only
    /// differentiates the block's output) the product itself is skipped: see [`Self::frozen_after`].
    pub fn forward_after_gelu(
        &self,
        be: Backend,
        x: &Tensor,
        residual: Option<&Tensor>,
        value_unused: bool,
    ) -> Result<Option<Tensor>> {
        if let Some(y) = self.frozen_after(
            be,
            "gelu-frozen-linear",
            &[x],
            residual,
            value_unused,
            |be, a| gelu_erf(be, &a[0]),
            |be, a, da| Ok(vec![gelu_erf_backward(be, &a[0], da)?]),
        )? {
            return Ok(Some(y));
        }
        let Some(w) = self.frozen_dense() else {
            return Ok(None);
        };
        Ok(gelu_then_frozen_linear(
            be,
            x,
            w,
            self.bias.as_ref(),
            residual,
        )?)
    }

    /// `residual + this linear applied to silu(gate) * up`, likewise.
    pub fn forward_after_swiglu(
        &self,
        be: Backend,
        gate: &Tensor,
        up: &Tensor,
        residual: Option<&Tensor>,
        value_unused: bool,
    ) -> Result<Option<Tensor>> {
        if let Some(y) = self.frozen_after(
            be,
            "swiglu-frozen-linear",
            &[gate, up],
            residual,
            value_unused,
            |be, a| swiglu(be, &a[0], &a[1]),
            |be, a, da| {
                let (dg, du) = swiglu_backward(be, &a[0], &a[1], da)?;
                Ok(vec![dg, du])
            },
        )? {
            return Ok(Some(y));
        }
        let Some(w) = self.frozen_dense() else {
            return Ok(None);
        };
        Ok(swiglu_then_frozen_linear(
            be,
            gate,
            up,
            w,
            self.bias.as_ref(),
            residual,
        )?)
    }

    /// The dense weight of a linear without adapters (what the fused kernels take).
    fn frozen_dense(&self) -> Option<&Tensor> {
        if self.adapters.is_empty() {
            self.dense_weight()
        } else {
            None
        }
    }

    /// The frozen weight (dense or quantized) and bias of a linear without adapters.
    pub(crate) fn frozen_parts(&self) -> Option<(FrozenWeight, Option<Tensor>)> {
        self.adapters
            .is_empty()
            .then(|| (self.weight.clone(), self.bias.clone()))
    }

    /// `residual + act(inputs) @ W^T + b` for a linear without adapters, as one op keeping
    /// only its inputs (the activation is recomputed in the backward pass): for a quantized
    /// weight, and for a dense one with `value_unused` (otherwise its fused kernels serve);
    /// `None` in the other cases. `act` maps the detached inputs to the projection's input,
    /// `act_grad` maps (inputs, d(projection input)) to the inputs' gradients.
    ///
    /// `value_unused` says that nothing reads this op's value, only its gradient flows:
    /// activation checkpointing recomputes a block to differentiate `sum(block(x) * dL/dy)`,
    /// and the MLP's last product goes straight into that output. The forward then computes
    /// neither the activation nor the product (a quarter of a Llama block's multiply-adds)
    /// and returns the residual, or zeros, as a placeholder; the backward is the same
    /// function of the inputs as always, so the gradients are exactly the full forward's.
    #[allow(clippy::too_many_arguments)]
    fn frozen_after(
        &self,
        be: Backend,
        name: &'static str,
        inputs: &[&Tensor],
        residual: Option<&Tensor>,
        value_unused: bool,
        act: fn(Backend, &[Tensor]) -> candle_core::Result<Tensor>,
        act_grad: fn(Backend, &[Tensor], &Tensor) -> candle_core::Result<Vec<Tensor>>,
    ) -> Result<Option<Tensor>> {
        let Some((w, bias)) = self.frozen_parts() else {
            return Ok(None);
        };
        if w.as_quantized().is_none() && !value_unused {
            return Ok(None);
        }
        let n = inputs.len();
        let all: Vec<&Tensor> = inputs.iter().copied().chain(residual).collect();
        let mut out_dims = inputs[0].dims().to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = w.dims().0;
        }
        let wg = w.clone();
        Ok(Some(recompute(
            name,
            &all,
            |a| {
                if value_unused {
                    return match a.get(n) {
                        Some(r) => Ok(r.clone()),
                        None => Tensor::zeros(out_dims, a[0].dtype(), a[0].device()),
                    };
                }
                let y = w.forward_no_grad(be, &act(be, &a[..n])?, bias.as_ref())?;
                a.get(n).map_or(Ok(y.clone()), |r| r + &y)
            },
            move |a, dy| {
                let da = wg.input_grad(be, dy)?;
                let mut g: Vec<Option<Tensor>> =
                    act_grad(be, &a[..n], &da)?.into_iter().map(Some).collect();
                if a.len() > n {
                    g.push(Some(dy.clone()));
                }
                Ok(g)
            },
        )?))
    }

    /// x W^T + b.
    fn frozen_forward(&self, be: Backend, x: &Tensor) -> Result<Tensor> {
        match &self.weight {
            FrozenWeight::Dense(w) => Ok(frozen_forward(be, x, w, self.bias.as_ref())?),
            FrozenWeight::Quantized(q) => q.linear(x, self.bias.as_ref()),
        }
    }

    /// Every adapter together: A stacked (n_adapters * r, in), B placed at its rows
    /// (out, n_adapters * r), in adapter order; `None` without adapters. The update is
    /// `scaling * B @ A`.
    pub fn stacked(&self) -> Result<Option<(Tensor, Tensor)>> {
        if self.adapters.is_empty() {
            return Ok(None);
        }
        Ok(Some((self.a_stack()?, self.b_block()?)))
    }

    /// alpha / r of the attached adapters.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// scaling * B_block @ A_stack, the (out, in) update that merging adds to W.
    pub fn delta_weight(&self) -> Result<Option<Tensor>> {
        if self.adapters.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            (self.b_block()?.matmul(&self.a_stack()?)? * self.scaling)?,
        ))
    }

    /// Folds the adapters into the weight (computed in f32) and drops them. A quantized
    /// weight becomes dense, in `dense_dtype`; with `keep_blocks` only the rows the adapters
    /// change do (held as f32 rows among its parts), and every other row keeps its blocks, so
    /// that a GGUF export copies them as they are (a fused qkv with adapters on q and v
    /// keeps k's blocks). Such a weight is for export: products with it are slower.
    pub fn merge(&mut self, dense_dtype: DType, keep_blocks: bool) -> Result<()> {
        let Some(delta) = self.delta_weight()? else {
            return Ok(());
        };
        let kept = match &self.weight {
            FrozenWeight::Quantized(q) if keep_blocks => self.merged_rows(q, &delta)?,
            _ => None,
        };
        self.weight = match (&self.weight, kept) {
            (_, Some(merged)) => FrozenWeight::Quantized(Arc::new(merged)),
            (FrozenWeight::Dense(w), None) => {
                FrozenWeight::Dense((w.to_dtype(delta.dtype())? + delta)?.to_dtype(w.dtype())?)
            }
            (FrozenWeight::Quantized(q), None) => {
                let w = q.dequantize(DType::F32)?.to_dtype(delta.dtype())?;
                FrozenWeight::Dense((w + delta)?.to_dtype(dense_dtype)?)
            }
        };
        self.adapters.clear();
        Ok(())
    }

    /// `q + delta` with the rows no adapter covers left as `q`'s blocks and the covered ones
    /// as f32 rows; `None` when the adapters cover every row.
    fn merged_rows(&self, q: &QuantWeight, delta: &Tensor) -> Result<Option<QuantWeight>> {
        // Adapters cover disjoint row ranges (one per target); spans alternate kept / adapted.
        // Overlapping ranges (no target makes them) take the plain dense merge.
        let mut covered: Vec<Range<usize>> = self.adapters.iter().map(|a| a.rows.clone()).collect();
        covered.sort_by_key(|r| r.start);
        let mut spans: Vec<(Range<usize>, bool)> = Vec::new();
        let mut row = 0;
        for r in covered {
            if r.start < row {
                return Ok(None);
            }
            if r.start > row {
                spans.push((row..r.start, false));
            }
            row = r.end;
            spans.push((r, true));
        }
        if row < q.rows() {
            spans.push((row..q.rows(), false));
        }
        if spans.iter().all(|(_, adapted)| *adapted) {
            return Ok(None);
        }
        let name = format!("{}.weight", self.name);
        let parts = spans
            .into_iter()
            .map(|(r, adapted)| {
                let rows = q.narrow_rows(r.start, r.len())?;
                if !adapted {
                    return Ok(rows);
                }
                let d = delta.narrow(0, r.start, r.len())?.to_dtype(DType::F32)?;
                let merged = (rows.dequantize(DType::F32)? + d)?;
                QuantWeight::quantize(&name, &merged, QuantKind(GgmlDType::F32))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(QuantWeight::stack(&name, parts)?))
    }

    /// Replaces a dense weight by its quantization to `kind` (adapters untouched).
    pub fn quantize(&mut self, kind: crate::quant::QuantKind) -> Result<()> {
        if let FrozenWeight::Dense(w) = &self.weight {
            let q = QuantWeight::quantize(&format!("{}.weight", self.name), w, kind)?;
            self.weight = FrozenWeight::Quantized(Arc::new(q));
        }
        Ok(())
    }
}

/// Inverted-dropout mask: 0 with probability p, else 1/(1-p).
/// The adapters' input in their dtype, times the dropout mask drawn from `mask`'s seed.
fn dropped(x: &Tensor, mask: Option<(f64, u64)>, dtype: DType) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(dtype)?;
    match mask {
        Some((p, seed)) => {
            let m = dropout_mask(x.dims(), p, seed, x.device())?;
            x.mul(&m.to_dtype(dtype)?)
        }
        None => Ok(x),
    }
}

/// scaling * dropout(x) @ A^T: (.., n_adapters * r).
fn lora_down(
    x: &Tensor,
    a: &Tensor,
    scaling: f64,
    mask: Option<(f64, u64)>,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    dropped(x, mask, dtype)?.broadcast_matmul(&a.t()?)? * scaling
}

fn dropout_mask(dims: &[usize], p: f64, seed: u64, device: &Device) -> candle_core::Result<Tensor> {
    let keep = 1.0 / (1.0 - p);
    if !device.is_cpu() {
        // Drawn on the device (a host-drawn mask costs more than the step's GEMMs on a GPU):
        // a fresh generator from the seed gives the same mask again in the backward pass.
        device.set_seed(seed)?;
        let u = Tensor::rand(0f32, 1f32, dims, device)?;
        return u.ge(p)?.to_dtype(DType::F32)? * keep;
    }
    let mut rng = Rng::new(seed);
    let (keep, p) = (keep as f32, p as f32);
    let n: usize = dims.iter().product();
    let mask: Vec<f32> = (0..n)
        .map(|_| if rng.uniform() < p { 0.0 } else { keep })
        .collect();
    Tensor::from_vec(mask, dims, device)
}

pub(crate) fn check_shape(name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(Error::ShapeMismatch {
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: t.dims().to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_diff, randn};

    #[test]
    fn config_validation_names_the_problem() {
        let mut c = LoraConfig::default();
        c.validate().unwrap();
        assert_eq!(c.scaling(), 2.0);
        c.r = 0;
        assert!(c.validate().unwrap_err().to_string().contains("rank r"));
        let c = LoraConfig {
            targets: LoraTargets {
                query: false,
                value: false,
                ..LoraTargets::default()
            },
            ..LoraConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("no target"));
    }

    /// The forward pass (mask drawn from a seed, update inside the frozen op) against the
    /// textbook composite with the same mask: output and the gradients of x, A and B.
    #[test]
    fn adapters_with_dropout_match_the_composite() {
        for be in [Backend::CpuKernels, Backend::Tensor] {
            adapters_with_dropout_on(be);
        }
    }

    fn adapters_with_dropout_on(be: Backend) {
        let cfg = LoraConfig {
            r: 2,
            dropout: 0.3,
            ..LoraConfig::default()
        };
        let mut lin = LoraLinear::frozen("l", randn(&[7, 5], 1), Some(randn(&[7], 2)));
        lin.set_adapter("query", 0..3, randn(&[2, 5], 3), randn(&[3, 2], 4), &cfg)
            .unwrap();
        lin.set_adapter("value", 5..7, randn(&[2, 5], 5), randn(&[2, 2], 6), &cfg)
            .unwrap();
        let x = Var::from_tensor(&randn(&[2, 3, 5], 7)).unwrap();
        let r = randn(&[2, 3, 7], 8);
        let mut rng = Rng::new(9);
        let y = lin
            .forward(be, x.as_tensor(), Some(&mut DropoutCtx::new(&mut rng)))
            .unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();

        let seed = Rng::new(9).next_u64();
        let mask = dropout_mask(&[2, 3, 5], 0.3, seed, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let zeros = mask.eq(0.0).unwrap().to_dtype(DType::F64).unwrap();
        let dropped_share = zeros.mean_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(
            dropped_share > 0.1 && dropped_share < 0.6,
            "{dropped_share}"
        );
        let xd = x.as_tensor().mul(&mask).unwrap();
        let mut want = x
            .as_tensor()
            .broadcast_matmul(&lin.dense_weight().unwrap().t().unwrap())
            .unwrap()
            .broadcast_add(lin.bias.as_ref().unwrap())
            .unwrap();
        let mut parts = Vec::new();
        for ad in lin.adapters() {
            let d = xd
                .broadcast_matmul(&ad.a.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_matmul(&ad.b.as_tensor().t().unwrap())
                .unwrap();
            parts.push((ad.rows.clone(), (d * lin.scaling()).unwrap()));
        }
        let mut cols = Vec::new();
        for j in 0..7 {
            let col = parts
                .iter()
                .find(|(rows, _)| rows.contains(&j))
                .map(|(rows, d)| d.narrow(2, j - rows.start, 1).unwrap())
                .unwrap_or_else(|| Tensor::zeros((2, 3, 1), DType::F64, &Device::Cpu).unwrap());
            cols.push(col);
        }
        want = (want + Tensor::cat(&cols, 2).unwrap()).unwrap();
        assert!(max_diff(&y, &want) < 1e-12);
        let gw = (&want * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut checked = vec![x.as_tensor().clone()];
        for ad in lin.adapters() {
            checked.push(ad.a.as_tensor().clone());
            checked.push(ad.b.as_tensor().clone());
        }
        for t in &checked {
            let d = max_diff(g.get(t).unwrap(), gw.get(t).unwrap());
            assert!(d < 1e-12, "gradient {:?}: {d}", t.dims());
        }
    }

    /// Merging into a quantized weight for an export that keeps its blocks: the rows no
    /// adapter covers keep their bytes, the covered ones hold W + delta in f32, and the whole
    /// equals the plain merge, in value and in products.
    #[test]
    fn merge_keeping_blocks_changes_only_the_adapted_rows() {
        use crate::test_util::randn_dtype;
        let cfg = LoraConfig {
            r: 2,
            ..LoraConfig::default()
        };
        let f32 = |shape: &[usize], seed| randn_dtype(shape, seed, DType::F32);
        let q = QuantWeight::quantize("w", &f32(&[8, 64], 1), QuantKind(GgmlDType::Q8_0)).unwrap();
        let fused = |rows: &[(&'static str, Range<usize>)]| {
            let w = FrozenWeight::Quantized(Arc::new(q.clone()));
            let mut lin = LoraLinear::with_weight("x.qkv", w, None);
            for (i, (target, r)) in rows.iter().enumerate() {
                let seed = 10 * i as u64;
                let (a, b) = (f32(&[2, 64], seed + 2), f32(&[r.len(), 2], seed + 3));
                lin.set_adapter(target, r.clone(), a, b, &cfg).unwrap();
            }
            lin
        };
        let qv = [("query", 0..3), ("value", 5..8)];
        let (mut kept, mut dense) = (fused(&qv), fused(&qv));
        kept.merge(DType::F32, true).unwrap();
        dense.merge(DType::F32, false).unwrap();
        let kq = kept.weight().as_quantized().expect("still blocks").clone();
        assert_eq!(kq.describe(), "f32:3+q8_0:2+f32:3");
        assert_eq!(
            kq.narrow_rows(3, 2).unwrap().raw_parts().unwrap(),
            q.narrow_rows(3, 2).unwrap().raw_parts().unwrap()
        );
        let want = dense.weight().as_dense().unwrap();
        assert_eq!(max_diff(&kq.dequantize(DType::F32).unwrap(), want), 0.0);
        // Up to 8 rows go through ggml's kernel, which rounds x to 8 bits for the q8_0 rows.
        for (rows, tol) in [(3, 1e-2), (12, 1e-6)] {
            let x = f32(&[rows, 64], 7);
            let be = Backend::CpuKernels;
            let (a, b) = (
                kept.weight().forward_no_grad(be, &x, None).unwrap(),
                dense.weight().forward_no_grad(be, &x, None).unwrap(),
            );
            let scale = max_diff(&b, &b.zeros_like().unwrap());
            let d = max_diff(&a, &b);
            assert!(d <= tol * scale, "{rows} rows: {d} (scale {scale})");
        }
        // Adapters over every row leave nothing to keep: the weight becomes dense.
        let mut all = fused(&[("query", 0..3), ("key", 3..5), ("value", 5..8)]);
        all.merge(DType::F32, true).unwrap();
        assert!(all.weight().as_dense().is_some());
    }

    #[test]
    fn adapter_shapes_are_checked() {
        let w = Tensor::zeros((6, 4), DType::F32, &Device::Cpu).unwrap();
        let mut lin = LoraLinear::frozen("x.qkv", w, None);
        let cfg = LoraConfig::default();
        let a = Tensor::zeros((8, 3), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap();
        let err = lin
            .set_adapter("query", 0..2, a, b, &cfg)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.qkv.lora_A.query") && err.contains("[8, 3]") && err.contains("[8, 4]"),
            "{err}"
        );
    }
}
