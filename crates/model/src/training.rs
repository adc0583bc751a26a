//! The training forward and backward of one packed micro-batch, owned by the model: the
//! blocks (the lowest ones under activation checkpointing if asked), the chunked lm_head and
//! cross-entropy (`loss`), and the backward pass into the LoRA parameters' gradients; plus
//! the same batch's loss with no graph (validation). The train crate's loop calls these and
//! nothing inside the model.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::lora::{no_grad, DropoutCtx};
use crate::loss::HeadLoss;
use crate::model::Gpt;
use crate::rng::Rng;

/// A packed micro-batch as the model reads it: sequences of `lengths` back to back in
/// `input_ids`, each from position 0, with `labels` aligned to them (a position's target is
/// the next label of its own sequence).
#[derive(Debug, Clone, Copy)]
pub struct PackedBatch<'a> {
    pub input_ids: &'a [u32],
    pub labels: &'a [i32],
    pub lengths: &'a [usize],
}

impl PackedBatch<'_> {
    /// Positions whose next-token target counts in the loss.
    pub fn n_targets(&self, ignore_index: i32) -> usize {
        crate::loss::target_rows(self.labels, self.lengths, ignore_index)
            .0
            .len()
    }
}

/// How a training forward runs.
#[derive(Debug, Clone, Copy)]
pub struct TrainOptions {
    /// Label value that marks a position with no target.
    pub ignore_index: i32,
    /// Recompute the first N blocks during the backward pass instead of keeping their
    /// activations (`None` or 0: keep everything).
    pub activation_checkpointing: Option<usize>,
}

/// The summed loss of a batch and how many targets it was summed over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchLoss {
    pub loss_sum: f64,
    pub n_targets: usize,
}

impl BatchLoss {
    fn of(h: &HeadLoss) -> BatchLoss {
        BatchLoss {
            loss_sum: h.loss_sum,
            n_targets: h.n_targets,
        }
    }
}

/// Gradients of a list of parameters summed over the backward passes of an optimizer step.
pub struct Gradients {
    vars: Vec<Var>,
    sums: Vec<Option<Tensor>>,
}

impl Gradients {
    /// Empty sums for `vars`, in their order (the optimizer's).
    pub fn new(vars: &[(String, Var)]) -> Gradients {
        Gradients {
            vars: vars.iter().map(|(_, v)| v.clone()).collect(),
            sums: vec![None; vars.len()],
        }
    }

    fn add(&mut self, g: &GradStore) -> Result<()> {
        for (slot, var) in self.sums.iter_mut().zip(&self.vars) {
            if let Some(gv) = g.get(var.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + gv)?,
                    None => gv.clone(),
                });
            }
        }
        Ok(())
    }

    /// One gradient per parameter, in order; zeros for one that no loss reached.
    pub fn into_tensors(self) -> Result<Vec<Tensor>> {
        self.sums
            .into_iter()
            .zip(&self.vars)
            .map(|(g, v)| match g {
                Some(g) => Ok(g),
                None => Ok(v.zeros_like()?),
            })
            .collect()
    }
}

impl Gpt {
    /// The summed next-token loss of `batch` and, into `grads`, `grad_scale` times its
    /// gradient with respect to the LoRA parameters (`grad_scale` = 1 / the optimizer step's
    /// targets gives the token mean over every micro-batch of the step). `rng` draws the
    /// LoRA dropout masks.
    pub fn loss_and_backward(
        &self,
        batch: &PackedBatch,
        opts: &TrainOptions,
        grad_scale: f64,
        rng: &mut Rng,
        grads: &mut Gradients,
    ) -> Result<BatchLoss> {
        let idx = self.batch_ids(batch)?;
        if let Some(n) = opts.activation_checkpointing.filter(|&n| n > 0) {
            let n = n.min(self.blocks.len());
            return self.checkpointed_backward(&idx, batch, opts, n, grad_scale, rng, grads);
        }
        let h =
            self.forward_hidden_packed(&idx, batch.lengths, Some(&mut DropoutCtx::new(&mut *rng)))?;
        let out = self.batch_head_loss(&h, batch, opts.ignore_index, Some(grad_scale))?;
        let loss = BatchLoss::of(&out);
        if let Some(surrogate) = out.surrogate {
            grads.add(&surrogate.backward()?)?;
        }
        Ok(loss)
    }

    /// The summed next-token loss of `batch` with no graph and no dropout (validation).
    pub fn loss(&self, batch: &PackedBatch, ignore_index: i32) -> Result<BatchLoss> {
        let idx = self.batch_ids(batch)?;
        let out = no_grad(|| -> Result<_> {
            let h = self.forward_hidden_packed(&idx, batch.lengths, None)?;
            self.batch_head_loss(&h, batch, ignore_index, None)
        })?;
        Ok(BatchLoss::of(&out))
    }

    fn batch_head_loss(
        &self,
        h: &Tensor,
        batch: &PackedBatch,
        ignore_index: i32,
        grad_scale: Option<f64>,
    ) -> Result<HeadLoss> {
        self.head_loss(h, batch.labels, batch.lengths, ignore_index, grad_scale)
    }

    fn batch_ids(&self, batch: &PackedBatch) -> Result<Tensor> {
        if batch.labels.len() != batch.input_ids.len() {
            return Err(Error::Input(format!(
                "packed batch: {} labels for {} token ids",
                batch.labels.len(),
                batch.input_ids.len()
            )));
        }
        Ok(Tensor::from_slice(
            batch.input_ids,
            batch.input_ids.len(),
            self.device(),
        )?)
    }

    /// One micro-batch with activation checkpointing of the first `n_ckpt` blocks. Forward:
    /// each of those runs on a detached input and only that input is kept (the block's graph
    /// is dropped with its output); the blocks above run as usual from a variable. Backward:
    /// the loss is backpropagated through the upper blocks to that variable; then from block
    /// `n_ckpt - 1` down to block 0, the block is recomputed with its input as a variable,
    /// with the dropout RNG replayed from where the forward pass drew, and `sum(y * dL/dy)`
    /// is backpropagated, giving the block's adapter gradients and dL/d(input) for the block
    /// below. That recomputation never reads y itself, so it skips the MLP's last product
    /// (`DropoutCtx::recompute`).
    #[allow(clippy::too_many_arguments)]
    fn checkpointed_backward(
        &self,
        idx: &Tensor,
        batch: &PackedBatch,
        opts: &TrainOptions,
        n_ckpt: usize,
        grad_scale: f64,
        rng: &mut Rng,
        grads: &mut Gradients,
    ) -> Result<BatchLoss> {
        let lengths = Some(batch.lengths);
        let mut inputs = Vec::with_capacity(n_ckpt);
        let mut rng_states = Vec::with_capacity(n_ckpt);
        let mut x = self.embed_packed(idx, batch.lengths)?.detach();
        for i in 0..n_ckpt {
            rng_states.push(rng.state());
            let y = self.forward_block(i, &x, lengths, Some(&mut DropoutCtx::new(&mut *rng)))?;
            inputs.push(std::mem::replace(&mut x, y.detach()));
        }
        let top = Var::from_tensor(&x)?;
        drop(x);
        let mut x = top.as_tensor().clone();
        for i in n_ckpt..self.blocks.len() {
            x = self.forward_block(i, &x, lengths, Some(&mut DropoutCtx::new(&mut *rng)))?;
        }
        let h = self.ln_f.forward(self.backend(), &x)?;
        drop(x);
        let out = self.batch_head_loss(&h, batch, opts.ignore_index, Some(grad_scale))?;
        drop(h);
        let loss = BatchLoss::of(&out);
        let Some(surrogate) = out.surrogate else {
            return Ok(loss);
        };
        let g = surrogate.backward()?;
        drop(surrogate);
        grads.add(&g)?;
        let mut dy = g
            .get(top.as_tensor())
            .ok_or_else(|| {
                Error::Backward("no gradient reached the checkpointed blocks' output".into())
            })?
            .clone();
        drop(g);
        for i in (0..n_ckpt).rev() {
            let Some(x_i) = inputs.pop() else { break };
            let xin = Var::from_tensor(&x_i)?;
            drop(x_i);
            let mut replay = Rng::from_state(rng_states[i]);
            let y = self.forward_block(
                i,
                xin.as_tensor(),
                lengths,
                Some(&mut DropoutCtx {
                    rng: &mut replay,
                    recompute: true,
                }),
            )?;
            let g = (y * &dy)?.sum_all()?.backward()?;
            grads.add(&g)?;
            if i > 0 {
                dy = g
                    .get(xin.as_tensor())
                    .ok_or_else(|| {
                        Error::Backward(format!("no gradient reached block {i}'s input"))
                    })?
                    .clone();
            }
        }
        Ok(loss)
    }
}
