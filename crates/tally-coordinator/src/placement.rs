//! Where a write goes when its owner cannot take it: a pure rule over what
//! the coordinator knows of each node, tested from a table of cases below.

/// A node as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteState {
    /// The last call or probe succeeded.
    pub up: bool,
    /// A drain has begun: it takes no writes.
    pub draining: bool,
    /// Its drain has handed its entries and idempotency records over to its
    /// adopter (its stand-in).
    pub handed_over: bool,
    /// Its stand-in has taken over its keyed increments and it has not
    /// reconciled yet: reads count the stand-in's frozen copy as its part,
    /// so nothing written to it would be seen.
    pub taken_over: bool,
}

impl WriteState {
    fn takes_writes(self) -> bool {
        self.up && !self.draining && !self.taken_over
    }
}

/// Where an increment goes: a node, and the node whose stripe it is when
/// that is another one standing in for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The node to send it to.
    pub node: usize,
    /// The owner, when `node` stands in for it.
    pub on_behalf_of: Option<usize>,
    /// The owner is down: `node` takes over its keyed increments.
    pub takeover: bool,
}

/// The node an increment goes to: its `owner` while the owner takes writes.
/// Otherwise:
/// - without a key, the first of `successors()` (the ring's order from the
///   owner on; only walked then) that takes writes: any node may hold any
///   entry;
/// - with a key, only a node that holds the owner's idempotency records,
///   its `stand_in()`, on its behalf: once the owner's drain has handed
///   them over (the adopter the drain recorded), or while the owner is down
///   (its first replica, which takes its keyed increments over:
///   `takeover`). While a drain has only begun, the owner: the call is sent
///   back and the client retries; it never lands where the key could apply
///   twice.
///
/// With nowhere else to go, the owner (the call then fails there).
pub fn write_target<S: IntoIterator<Item = usize>>(
    owner: usize,
    successors: impl FnOnce() -> S,
    stand_in: impl FnOnce() -> Option<usize>,
    state: impl Fn(usize) -> WriteState,
    keyed: bool,
) -> Target {
    let at = |node| Target {
        node,
        on_behalf_of: None,
        takeover: false,
    };
    let owner_state = state(owner);
    if owner_state.takes_writes() {
        return at(owner);
    }
    if keyed {
        // Down (or taken over) and not being drained: taken over. Handed
        // over: adopted.
        let takeover = (!owner_state.up || owner_state.taken_over) && !owner_state.draining;
        if !(takeover || owner_state.handed_over) {
            return at(owner);
        }
        return match stand_in() {
            Some(stand_in) if state(stand_in).takes_writes() => Target {
                node: stand_in,
                on_behalf_of: Some(owner),
                takeover,
            },
            _ => at(owner),
        };
    }
    at(successors()
        .into_iter()
        .find(|&node| state(node).takes_writes())
        .unwrap_or(owner))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: WriteState = WriteState {
        up: true,
        draining: false,
        handed_over: false,
        taken_over: false,
    };
    const DOWN: WriteState = WriteState { up: false, ..UP };
    const DRAINING: WriteState = WriteState {
        draining: true,
        ..UP
    };
    const HANDED_OVER: WriteState = WriteState {
        draining: true,
        handed_over: true,
        ..UP
    };
    const TAKEN_OVER: WriteState = WriteState {
        taken_over: true,
        ..UP
    };

    #[test]
    fn a_write_goes_to_its_owner_or_a_node_that_can_take_it() {
        // (case, states of nodes 0 (the owner), 1, 2 (the nodes after it in
        // ring order; node 2 is the owner's stand-in), keyed, expected node,
        // on behalf of the owner, taken over)
        let cases = [
            ("owner up", [UP, UP, UP], false, 0, false, false),
            ("owner up, keyed", [UP, UP, UP], true, 0, false, false),
            ("owner down", [DOWN, UP, UP], false, 1, false, false),
            (
                "owner down, keyed: its stand-in takes it over",
                [DOWN, UP, UP],
                true,
                2,
                true,
                true,
            ),
            (
                "owner down, keyed, its stand-in down: stays",
                [DOWN, UP, DOWN],
                true,
                0,
                false,
                false,
            ),
            (
                "owner back but not reconciled, keyed: still its stand-in's",
                [TAKEN_OVER, UP, UP],
                true,
                2,
                true,
                true,
            ),
            (
                "owner back but not reconciled: around it",
                [TAKEN_OVER, UP, UP],
                false,
                1,
                false,
                false,
            ),
            (
                "owner and next down",
                [DOWN, DOWN, UP],
                false,
                2,
                false,
                false,
            ),
            (
                "a draining successor is skipped",
                [DOWN, DRAINING, UP],
                false,
                2,
                false,
                false,
            ),
            ("owner draining", [DRAINING, UP, UP], false, 1, false, false),
            (
                "owner draining, keyed: stays until it has handed over its records",
                [DRAINING, UP, UP],
                true,
                0,
                false,
                false,
            ),
            (
                "owner handed over, keyed: its stand-in, on its behalf",
                [HANDED_OVER, UP, UP],
                true,
                2,
                true,
                false,
            ),
            (
                "owner handed over, keyed, its stand-in down: stays",
                [HANDED_OVER, UP, DOWN],
                true,
                0,
                false,
                false,
            ),
            ("nowhere else", [DOWN, DOWN, DOWN], false, 0, false, false),
            (
                "draining, nowhere else",
                [DRAINING, DOWN, DRAINING],
                true,
                0,
                false,
                false,
            ),
        ];
        for (case, states, keyed, node, on_behalf, takeover) in cases {
            let target = write_target(0, || [0, 1, 2], || Some(2), |node| states[node], keyed);
            assert_eq!(
                target,
                Target {
                    node,
                    on_behalf_of: on_behalf.then_some(0),
                    takeover,
                },
                "{case}"
            );
        }
    }
}
