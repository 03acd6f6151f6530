//! One backend's health as HAProxy counts it: up until `fall` consecutive failures, down
//! until `rise` consecutive passes; a result of the other kind resets the count.

/// The rise/fall state of one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    pub up: bool,
    /// Consecutive passes (while down) or failures (while up) so far.
    pub streak: u32,
}

impl Health {
    pub fn new(up: bool) -> Health {
        Health { up, streak: 0 }
    }

    /// Count one check result; true if the state changed.
    pub fn record(&mut self, pass: bool, rise: u32, fall: u32) -> bool {
        if pass == self.up {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        let needed = if self.up { fall } else { rise };
        if self.streak >= needed {
            self.up = pass;
            self.streak = 0;
            return true;
        }
        false
    }

    /// On its way to another state (checks then run at `fastinter`).
    pub fn changing(&self) -> bool {
        self.streak > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `results` ('+' pass, '-' fail); the states after each.
    fn run(up: bool, rise: u32, fall: u32, results: &str) -> String {
        let mut h = Health::new(up);
        results
            .chars()
            .map(|c| {
                h.record(c == '+', rise, fall);
                if h.up {
                    'U'
                } else {
                    'D'
                }
            })
            .collect()
    }

    #[test]
    fn fall_failures_in_a_row_take_it_down_and_rise_passes_bring_it_back() {
        assert_eq!(run(true, 2, 3, "--+---++"), "UUUUUDDU");
        // A pass between failures resets the count, and so does a failure between passes.
        assert_eq!(run(true, 2, 3, "--+--+--"), "UUUUUUUU");
        assert_eq!(run(false, 2, 3, "+-+-++"), "DDDDDU");
        assert_eq!(run(true, 1, 1, "-+-+"), "DUDU");
    }

    #[test]
    fn a_backend_changing_state_is_marked_so() {
        let mut h = Health::new(true);
        assert!(!h.changing());
        h.record(false, 2, 3);
        assert!(h.changing());
        h.record(true, 2, 3);
        assert!(!h.changing());
    }
}
