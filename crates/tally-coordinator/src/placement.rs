//! Where a write goes when its owner cannot take it: a pure rule over what
//! the coordinator knows of each node, tested from a table of cases below.

/// A node as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteState {
    /// The last call or probe succeeded.
    pub up: bool,
    /// A drain has begun: it takes no writes.
    pub draining: bool,
}

impl WriteState {
    fn takes_writes(self) -> bool {
        self.up && !self.draining
    }
}

/// The node an increment goes to: its `owner`, unless the owner is down and
/// the increment has no key; then the first of `successors()` (the ring's
/// order from the owner on; only walked then) that takes writes. A keyed increment stays with a
/// down owner, the only node that remembers its key. A node being drained
/// takes no writes at all: every increment it owns goes on, keyed ones
/// too. With nowhere else to go, the owner (the call then fails there).
pub fn write_target<S: IntoIterator<Item = usize>>(
    owner: usize,
    successors: impl FnOnce() -> S,
    state: impl Fn(usize) -> WriteState,
    keyed: bool,
) -> usize {
    let owner_state = state(owner);
    if !owner_state.draining && (owner_state.up || keyed) {
        return owner;
    }
    successors()
        .into_iter()
        .find(|&node| state(node).takes_writes())
        .unwrap_or(owner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: WriteState = WriteState {
        up: true,
        draining: false,
    };
    const DOWN: WriteState = WriteState {
        up: false,
        draining: false,
    };
    const DRAINING: WriteState = WriteState {
        up: true,
        draining: true,
    };

    #[test]
    fn a_write_goes_to_its_owner_or_the_first_node_after_it_that_takes_writes() {
        // (case, states of nodes 0 (the owner), 1, 2 (the nodes after it in
        // ring order), keyed, expected node)
        let cases = [
            ("owner up", [UP, UP, UP], false, 0),
            ("owner up, keyed", [UP, UP, UP], true, 0),
            ("owner down", [DOWN, UP, UP], false, 1),
            ("owner down, keyed: stays", [DOWN, UP, UP], true, 0),
            ("owner and next down", [DOWN, DOWN, UP], false, 2),
            (
                "a draining successor is skipped",
                [DOWN, DRAINING, UP],
                false,
                2,
            ),
            ("owner draining", [DRAINING, UP, UP], false, 1),
            (
                "owner draining, keyed: moves too",
                [DRAINING, UP, UP],
                true,
                1,
            ),
            ("nowhere else", [DOWN, DOWN, DOWN], false, 0),
            (
                "draining, nowhere else",
                [DRAINING, DOWN, DRAINING],
                true,
                0,
            ),
        ];
        for (case, states, keyed, expected) in cases {
            let target = write_target(0, || [0, 1, 2], |node| states[node], keyed);
            assert_eq!(target, expected, "{case}");
        }
    }
}
