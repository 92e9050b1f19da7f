//! The trainer's bookkeeping of losses: [`DivergenceGuard`] (skip a step
//! whose loss is not finite or far above the running median) and
//! [`LossWindow`] (mean losses and images since the last log line or
//! checkpoint). Plain numbers: no tensors, no I/O.

use crate::vae::learner::LossValues;
use std::collections::VecDeque;

/// Accepted losses the running median covers.
const GUARD_WINDOW: usize = 100;
/// Losses needed before the median judges anything: the first steps of a
/// fresh model fall fast, and a median of a handful would refuse them.
const GUARD_MIN_HISTORY: usize = 20;

/// Skips non-finite losses and losses above `factor` x the running median.
pub struct DivergenceGuard {
    factor: f64,
    recent: VecDeque<f64>,
    /// Losses refused since the last accepted one.
    pub bad_in_a_row: usize,
}

impl DivergenceGuard {
    pub fn new(factor: f64) -> DivergenceGuard {
        DivergenceGuard {
            factor,
            recent: VecDeque::with_capacity(GUARD_WINDOW),
            bad_in_a_row: 0,
        }
    }

    /// Whether the step that produced `loss` may be applied.
    pub fn accept(&mut self, loss: &LossValues) -> bool {
        let ok = loss.total.is_finite()
            && (self.recent.len() < GUARD_MIN_HISTORY || loss.total <= self.factor * self.median());
        if ok {
            if self.recent.len() == GUARD_WINDOW {
                self.recent.pop_front();
            }
            self.recent.push_back(loss.total);
            self.bad_in_a_row = 0;
        } else {
            self.bad_in_a_row += 1;
        }
        ok
    }

    fn median(&self) -> f64 {
        let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }
}

/// Losses and images since the last log line or checkpoint (or over one eval).
#[derive(Default)]
pub struct LossWindow {
    pub steps: u64,
    pub images: u64,
    sum: LossValues,
}

impl LossWindow {
    pub fn add(&mut self, loss: &LossValues, images: u64) {
        self.steps += 1;
        self.images += images;
        self.sum = LossValues {
            total: self.sum.total + loss.total,
            recon: self.sum.recon + loss.recon,
            kl: self.sum.kl + loss.kl,
        };
    }

    /// The mean losses; None while the window is empty.
    pub fn mean(&self) -> Option<LossValues> {
        let n = self.steps as f64;
        (self.steps > 0).then(|| LossValues {
            total: self.sum.total / n,
            recon: self.sum.recon / n,
            kl: self.sum.kl / n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss(total: f64) -> LossValues {
        LossValues {
            total,
            recon: total - 1.0,
            kl: 1.0,
        }
    }

    #[test]
    fn guard_accepts_anything_finite_until_it_has_a_history() {
        let mut guard = DivergenceGuard::new(3.0);
        assert!(guard.accept(&loss(100.0)));
        assert!(guard.accept(&loss(1e9)), "no median yet: a huge loss passes");
        assert!(!guard.accept(&loss(f64::NAN)), "NaN never passes");
        assert!(!guard.accept(&loss(f64::INFINITY)));
        assert_eq!(guard.bad_in_a_row, 2);
    }

    #[test]
    fn guard_refuses_losses_far_above_the_running_median_and_counts_them() {
        let mut guard = DivergenceGuard::new(3.0);
        for _ in 0..GUARD_MIN_HISTORY {
            assert!(guard.accept(&loss(10.0)));
        }
        assert!(guard.accept(&loss(29.0)), "under 3x the median of 10");
        assert!(!guard.accept(&loss(31.0)), "over 3x the median of 10");
        assert!(!guard.accept(&loss(1000.0)));
        assert_eq!(guard.bad_in_a_row, 2);
        assert!(guard.accept(&loss(9.0)));
        assert_eq!(guard.bad_in_a_row, 0, "an accepted loss ends the run of bad ones");
    }

    #[test]
    fn guard_median_follows_the_last_window_of_accepted_losses() {
        let mut guard = DivergenceGuard::new(2.0);
        for _ in 0..GUARD_WINDOW {
            guard.accept(&loss(100.0));
        }
        // The loss falls: after a full window of 10s, 100 is far above the median.
        for _ in 0..GUARD_WINDOW {
            assert!(guard.accept(&loss(10.0)));
        }
        assert!(!guard.accept(&loss(100.0)));
        assert_eq!(guard.recent.len(), GUARD_WINDOW, "the window stays bounded");
    }

    #[test]
    fn window_means_and_counts() {
        let mut window = LossWindow::default();
        assert_eq!(window.mean(), None);
        window.add(
            &LossValues {
                total: 10.0,
                recon: 8.0,
                kl: 2.0,
            },
            100,
        );
        window.add(
            &LossValues {
                total: 20.0,
                recon: 14.0,
                kl: 6.0,
            },
            100,
        );
        assert_eq!((window.steps, window.images), (2, 200));
        assert_eq!(
            window.mean(),
            Some(LossValues {
                total: 15.0,
                recon: 11.0,
                kl: 4.0
            })
        );
    }
}
