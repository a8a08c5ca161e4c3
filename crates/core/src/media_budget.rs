//! The memory decoded media may hold across every request in flight
//! (`media_memory_mb`): decoded images, their tiles, sampled video frames.
//!
//! Each request's pixels cost memory from the moment they are decoded until
//! the request ends (its tiles stay in its prompt until then), and nothing
//! else bounds their sum: each image is bounded alone (`max_image_alloc_mb`),
//! each request's tiles alone (`max_tiles_per_request`), but seventy small
//! requests each at those bounds are gigabytes. A request takes what it is
//! about to decode from this budget first; what does not fit is refused with
//! a retry hint (RESOURCE_EXHAUSTED) before anything is decoded, and what
//! could never fit is refused as the request's fault.

use std::sync::{Arc, Mutex};

use crate::error::EngineError;

/// Bytes of decoded media that requests may hold together.
#[derive(Debug)]
pub struct MediaBudget {
    held: Mutex<u64>,
    limit: u64,
}

impl MediaBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            held: Mutex::new(0),
            limit,
        })
    }

    /// Bytes held by every request now.
    pub fn held(&self) -> u64 {
        *self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One request's share of the [`MediaBudget`], given back when dropped.
#[derive(Debug, Default)]
pub struct MediaHold {
    budget: Option<Arc<MediaBudget>>,
    bytes: u64,
}

impl MediaHold {
    /// An empty share of `budget`.
    pub fn new(budget: &Arc<MediaBudget>) -> Self {
        Self {
            budget: Some(budget.clone()),
            bytes: 0,
        }
    }

    /// A hold that bounds nothing (tools and tests that build prompts alone).
    pub fn unbounded() -> Self {
        Self::default()
    }

    /// Takes `bytes` more for what the part at `field` is about to decode:
    /// INVALID_ARGUMENT naming the field when the request alone would pass
    /// the whole budget, [`EngineError::MediaMemoryFull`] (to retry) when the
    /// requests in flight leave too little now.
    pub fn take(&mut self, bytes: u64, field: &str) -> Result<(), EngineError> {
        let Some(budget) = &self.budget else {
            return Ok(());
        };
        let mine = self.bytes.saturating_add(bytes);
        if mine > budget.limit {
            return Err(EngineError::invalid(
                field,
                format!(
                    "decoding it makes this request's media {} MiB, more than \
                     media_memory_mb ({} MiB) allows all requests together",
                    mine.div_ceil(1 << 20),
                    budget.limit >> 20
                ),
            ));
        }
        let mut held = budget.held.lock().unwrap_or_else(|p| p.into_inner());
        if *held + bytes > budget.limit {
            return Err(EngineError::MediaMemoryFull {
                needed_mb: bytes.div_ceil(1 << 20),
                limit_mb: budget.limit >> 20,
                retry_after_ms: 0,
            });
        }
        *held += bytes;
        self.bytes = mine;
        Ok(())
    }

    /// Gives back all but `bytes` (once a prompt is built: what its tiles
    /// keep; the decoded images and frames they were cut from are gone).
    pub fn keep_only(&mut self, bytes: u64) {
        if bytes >= self.bytes {
            return;
        }
        if let Some(budget) = &self.budget {
            let mut held = budget.held.lock().unwrap_or_else(|p| p.into_inner());
            *held -= self.bytes - bytes;
        }
        self.bytes = bytes;
    }

    /// Bytes this request holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for MediaHold {
    fn drop(&mut self) {
        self.keep_only(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_share_the_budget_and_give_it_back() {
        let budget = MediaBudget::new(100);
        let mut a = MediaHold::new(&budget);
        let mut b = MediaHold::new(&budget);
        a.take(60, "a").unwrap();
        assert!(matches!(
            b.take(50, "b"),
            Err(EngineError::MediaMemoryFull { .. })
        ));
        b.take(40, "b").unwrap();
        assert_eq!(budget.held(), 100);
        a.keep_only(10);
        assert_eq!((a.bytes(), budget.held()), (10, 50));
        b.take(50, "b").unwrap();
        drop(a);
        drop(b);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_request_larger_than_the_budget_is_its_own_fault() {
        let budget = MediaBudget::new(100);
        let mut a = MediaHold::new(&budget);
        a.take(70, "x").unwrap();
        let err = a.take(40, "messages[0].content[2].image").unwrap_err();
        assert!(matches!(
            err,
            EngineError::InvalidArgument { ref field, .. } if field == "messages[0].content[2].image"
        ));
        assert_eq!(budget.held(), 70, "a refused take holds nothing");
        assert!(MediaHold::unbounded().take(u64::MAX, "y").is_ok());
    }
}
