//! `KvCache`: one layer's keys and values for incremental decoding.
//!
//! Buffers of (B, n_query_groups, capacity, head_size) are allocated on first use and filled
//! in place; each step returns views of the filled prefix. Keys are stored after rotary.

use candle_core::Tensor;

use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct KvCache {
    capacity: usize,
    len: usize,
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl KvCache {
    /// A cache that holds at most `capacity` positions.
    pub fn new(capacity: usize) -> KvCache {
        KvCache {
            capacity,
            len: 0,
            k: None,
            v: None,
        }
    }

    /// Positions stored so far (the position offset of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything (buffers are kept for reuse).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Appends `k`, `v` of shape (B, G, T, hs) and returns all keys and values so far.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, g, t, hs) = k.dims4()?;
        if self.len + t > self.capacity {
            return Err(Error::Cache(format!(
                "{} cached + {t} new positions exceed the cache capacity of {}",
                self.len, self.capacity
            )));
        }
        let fits = |buf: &Option<Tensor>| {
            buf.as_ref().is_some_and(|buf| {
                buf.dims() == [b, g, self.capacity, hs] && buf.dtype() == k.dtype()
            })
        };
        if !fits(&self.k) || !fits(&self.v) {
            if self.len > 0 {
                return Err(Error::Cache(format!(
                    "new keys {:?} do not match the cached batch/heads/head size",
                    k.dims()
                )));
            }
            let shape = (b, g, self.capacity, hs);
            self.k = Some(Tensor::zeros(shape, k.dtype(), k.device())?);
            self.v = Some(Tensor::zeros(shape, v.dtype(), v.device())?);
        }
        let (kb, vb) = (
            self.k.as_ref().expect("allocated"),
            self.v.as_ref().expect("allocated"),
        );
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += t;
        Ok((kb.narrow(2, 0, self.len)?, vb.narrow(2, 0, self.len)?))
    }
}
