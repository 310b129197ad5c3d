//! Tensor states and their legal transitions.
//!
//! ```text
//!   Free --write--> Hold <--release-- Compute
//!                    |  \--access-->     |  \
//!                    |                   |   release after backward
//!                    |                   v
//!                    |             HoldAfterBwd --(grads final)--> ReadyForUpdate
//!                    |                   |  (accumulate: access again)      |
//!                    +<-------------------------- update done --------------+
//!   Hold --discard--> Free   (contents no longer needed: a consumed gradient)
//! ```
//! A chunk with any tensor in `Compute` is never evicted. Anything not drawn above is an error
//! (Gemini ignores invalid transitions silently; here they are bugs worth reporting).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorState {
    /// No valid data yet.
    Free,
    /// Valid data, not in use.
    Hold,
    /// In use by an operation: its chunk is pinned on the compute tier.
    Compute,
    /// Its gradient was produced by a backward pass; more may accumulate.
    HoldAfterBwd,
    /// Gradients are final; the optimizer may update it.
    ReadyForUpdate,
}

impl TensorState {
    /// Whether `self -> to` is allowed.
    pub fn can_become(self, to: TensorState) -> bool {
        use TensorState::*;
        matches!(
            (self, to),
            (Free, Hold)
                | (Free, Compute)
                | (Hold, Compute)
                | (Compute, Hold)
                | (Compute, HoldAfterBwd)
                | (HoldAfterBwd, Compute)
                | (HoldAfterBwd, ReadyForUpdate)
                | (ReadyForUpdate, Compute)
                | (ReadyForUpdate, Hold)
                | (Hold, Free)
        )
    }

    /// Checks and returns the new state.
    pub fn transition(self, to: TensorState, what: &str) -> Result<TensorState> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(Error::InvalidState(format!("tensor {what}: {self:?} -> {to:?} is not a valid transition")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TensorState::*;
    use super::*;

    const ALL: [TensorState; 5] = [Free, Hold, Compute, HoldAfterBwd, ReadyForUpdate];

    #[test]
    fn the_training_cycle_is_allowed() {
        let mut s = Free;
        for to in [Compute, Hold, Compute, HoldAfterBwd, Compute, HoldAfterBwd, ReadyForUpdate, Compute, Hold] {
            s = s.transition(to, "w").unwrap();
        }
        assert_eq!(s, Hold);
    }

    #[test]
    fn everything_else_is_an_error() {
        let allowed = ALL.iter().flat_map(|&a| ALL.iter().map(move |&b| (a, b))).filter(|&(a, b)| a.can_become(b)).count();
        assert_eq!(allowed, 10);
        for (a, b) in [(Hold, ReadyForUpdate), (Free, HoldAfterBwd), (Compute, Compute), (HoldAfterBwd, Free), (Compute, Free), (Hold, Hold)] {
            let e = a.transition(b, "w").unwrap_err();
            assert!(e.to_string().contains("not a valid transition"), "{e}");
        }
    }
}
