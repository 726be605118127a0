//! The read merge: which answers make up each node's part of a read, so
//! that every acknowledged increment is counted once and none twice. A
//! pure function over the nodes' answers and a snapshot of what the
//! coordinator knows of each node; no I/O, so every rule is tested from a
//! table of cases below.

use crate::error::ShardCallError;
use crate::model::{CopyRead, NodeRead};

/// What the merge needs to know of one node besides its answer. The last
/// three fields matter only for a node that did not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView<'a> {
    /// Its id, as answers name it.
    pub id: &'a str,
    /// The nodes that keep its copy current (by index), in ring order.
    pub replicas: &'a [usize],
    /// This coordinator saw its entries handed over (drain).
    pub handed_over: bool,
    /// How old (ms, as the replica reports it: `CopyRead::age_ms`) a copy
    /// of it may be to stand in for it when it does not answer: as old as
    /// one replication and one detection interval before it failed, told
    /// from when the read began. Negative: no copy is recent enough.
    pub max_copy_age_ms: i64,
    /// `(replica, version)`: this coordinator itself brought that replica's
    /// copy to that version in a round that began recently enough (by the
    /// same measure): a copy there at that version or later is recent
    /// enough whatever age the replica reports (it may not know one: it
    /// restarted since).
    pub vouched: Vec<(usize, u64)>,
}

/// One node's answer, or why there is none.
pub type Answer = Result<NodeRead, ShardCallError>;

/// Node `node`'s part of a read, as the lists of per-counter parts to add:
/// one list per origin, so no entry is counted twice. Empty: it has none
/// (drained into another node's own).
///
/// - Handed over (its answer names the adopter): nothing if the adopter's
///   answer says it adopted it (its part is in the adopter's own), else the
///   adopter's copy, at the final version at least.
/// - Retired (otherwise, some answer says it adopted the node or dropped its
///   copy after a drain): its part is in the adopter's own.
/// - Restoring (started empty): its own answer plus the copy from its lost
///   directory; or, if a copy from its current directory already exists
///   (restored and replicated while this read ran), that copy.
/// - Answered: its own answer.
/// - No answer: the freshest copy among its replicas, if recent enough.
pub fn part_of<'a>(
    node: usize,
    views: &[NodeView<'_>],
    answers: &'a [Answer],
) -> Result<Vec<&'a [i128]>, ShardCallError> {
    let view = &views[node];
    let lists = |answer: &NodeRead| answer.retired.iter().any(|origin| origin == view.id);
    let retired = answers.iter().flatten().any(lists);
    let handed_over = matches!(&answers[node], Ok(answer) if answer.drained_to.is_some());
    if !handed_over && !retired {
        if let Some(fenced) = taken_over_part(node, views, answers) {
            return fenced;
        }
    }
    let answer = match &answers[node] {
        // Handed over: only its adopter's answer says whether it has
        // adopted yet. Another node may have dropped its copy (and listed
        // it retired) after the adoption, while the adopter's answer
        // predates it and still holds the copy.
        Ok(answer) if answer.drained_to.is_some() => answer,
        _ if retired => return Ok(Vec::new()),
        Ok(answer) => answer,
        Err(error) => {
            if view.handed_over {
                return Err(ShardCallError::Failed(
                    "drained, and its adopter's copy was not read".into(),
                ));
            }
            return recent_copy(node, views, answers)
                .map(|copy| vec![copy.parts.as_slice()])
                .ok_or_else(|| error.clone());
        }
    };
    if let Some(adopter_id) = &answer.drained_to {
        let adopter = views.iter().position(|other| other.id == adopter_id);
        let adopter_answer = adopter.and_then(|adopter| answers[adopter].as_ref().ok());
        if adopter_answer.is_some_and(lists) {
            // Adopted: its part is in the adopter's own.
            return Ok(Vec::new());
        }
        return adopter_answer
            .and_then(|adopter| adopter.copies.iter().find(|copy| copy.origin == view.id))
            .filter(|copy| copy.version >= answer.handed_over_version)
            .map(|copy| vec![copy.parts.as_slice()])
            .ok_or_else(|| {
                ShardCallError::Failed(format!(
                    "drained into {adopter_id}, whose answer did not hold its final copy"
                ))
            });
    }
    if answer.restoring {
        if view
            .replicas
            .iter()
            .any(|&replica| answers[replica].is_err())
        {
            return Err(ShardCallError::Failed(
                "restoring from its replicas, and one of them did not answer".into(),
            ));
        }
        return Ok(match freshest_copy(node, views, answers) {
            // Restored and replicated since it answered: the copy is all
            // of it.
            Some(copy) if copy.directory_id == answer.directory_id => vec![&copy.parts],
            // Its own answer plus its lost directory's copy.
            Some(copy) => vec![&answer.own, &copy.parts],
            None => vec![&answer.own],
        });
    }
    Ok(vec![&answer.own])
}

/// Node `origin`'s part while one of its replicas stands in for it (a
/// takeover of its keyed increments): that replica's copy of it, frozen when
/// the takeover began (it was recent enough then, by the bound reads use),
/// whether or not the node answers. The node may hold a key the stand-in
/// applied again; its own answer counts only once it has reconciled.
/// `None`: no answer says a replica stands in for it.
fn taken_over_part<'a>(
    origin: usize,
    views: &[NodeView<'_>],
    answers: &'a [Answer],
) -> Option<Result<Vec<&'a [i128]>, ShardCallError>> {
    let view = &views[origin];
    let stand_in = view
        .replicas
        .iter()
        .filter_map(|&replica| answers[replica].as_ref().ok())
        .find(|answer| answer.standing_in_for.iter().any(|id| id == view.id))?;
    Some(
        stand_in
            .copies
            .iter()
            .find(|copy| copy.origin == view.id)
            .map(|copy| vec![copy.parts.as_slice()])
            .ok_or_else(|| {
                ShardCallError::Failed(
                    "a replica stands in for it, and its answer holds no copy of it".into(),
                )
            }),
    )
}

/// A node whose answer was given before its reconciliation with a stand-in
/// while another answer was given after that takeover ended: the first
/// may still count a key the stand-in applied too (in doubt when the node
/// failed), which the second counts in the stand-in's own, and the
/// stand-in no longer says it stands in. Such answers do not make one
/// read; the caller reads again (each answer of the node since has a
/// version at or above the one its reconciliation returned).
pub fn answered_before_its_reconciliation(
    views: &[NodeView<'_>],
    answers: &[Answer],
) -> Option<usize> {
    (0..views.len()).find(|&node| {
        let Ok(answer) = &answers[node] else {
            return false;
        };
        answers
            .iter()
            .flatten()
            .flat_map(|other| &other.takeovers_ended)
            .any(|ended| {
                ended.origin == views[node].id
                    && ended.directory_id != 0
                    && ended.directory_id == answer.directory_id
                    && answer.version < ended.version
            })
    })
}

/// The freshest copy of node `origin`'s parts among the answers of its
/// replicas (only they are kept current; a node that held a copy before a
/// membership change may hold an old one).
fn freshest_copy<'a>(
    origin: usize,
    views: &[NodeView<'_>],
    answers: &'a [Answer],
) -> Option<&'a CopyRead> {
    let origin_id = views[origin].id;
    views[origin]
        .replicas
        .iter()
        .filter_map(|&replica| answers[replica].as_ref().ok())
        .flat_map(|answer| &answer.copies)
        .filter(|copy| copy.origin == origin_id)
        .max_by_key(|copy| copy.version)
}

/// The freshest copy of node `origin`'s parts that is known to be recent
/// enough, if any. A copy is *recent* if a replication round that began
/// recently enough (`NodeView::max_copy_age_ms`) reached it, or this
/// coordinator vouches for its version (`NodeView::vouched`); it then holds
/// everything the origin acknowledged before that round. So does any copy
/// of the same origin directory at a higher version (versions of one
/// directory only grow); a copy from another directory of the origin (a
/// replaced disk) proves nothing about this one. Ages are durations, each
/// measured on one node's monotonic clock: no clock readings of two nodes
/// are compared.
fn recent_copy<'a>(
    origin: usize,
    views: &[NodeView<'_>],
    answers: &'a [Answer],
) -> Option<&'a CopyRead> {
    let view = &views[origin];
    let copies: Vec<(usize, &CopyRead)> = view
        .replicas
        .iter()
        .filter_map(|&replica| Some((replica, answers[replica].as_ref().ok()?)))
        .flat_map(|(replica, answer)| answer.copies.iter().map(move |copy| (replica, copy)))
        .filter(|(_, copy)| copy.origin == view.id)
        .collect();
    let recent = |replica: usize, copy: &CopyRead| {
        let young = copy
            .age_ms
            .is_some_and(|age| i64::try_from(age).is_ok_and(|age| age <= view.max_copy_age_ms));
        young
            || view
                .vouched
                .iter()
                .any(|&(vouched, version)| vouched == replica && copy.version >= version)
    };
    let evidence: Vec<&CopyRead> = copies
        .iter()
        .filter(|(replica, copy)| recent(*replica, copy))
        .map(|(_, copy)| *copy)
        .collect();
    copies
        .iter()
        .map(|(_, copy)| *copy)
        .filter(|copy| {
            evidence.iter().any(|recent| {
                recent.directory_id == copy.directory_id && copy.version >= recent.version
            })
        })
        .max_by_key(|copy| copy.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three nodes x, y, z; each one's replica is the next.
    const IDS: [&str; 3] = ["x", "y", "z"];
    const REPLICAS: [[usize; 1]; 3] = [[1], [2], [0]];

    fn views(handed_over: bool, max_copy_age_ms: i64) -> Vec<NodeView<'static>> {
        (0..3)
            .map(|node| NodeView {
                id: IDS[node],
                replicas: &REPLICAS[node],
                handed_over,
                max_copy_age_ms,
                vouched: Vec::new(),
            })
            .collect()
    }

    fn own(value: i128) -> NodeRead {
        NodeRead {
            own: vec![value],
            ..Default::default()
        }
    }

    fn copy(
        origin: &str,
        version: u64,
        age_ms: Option<u64>,
        directory: u64,
        value: i128,
    ) -> CopyRead {
        CopyRead {
            origin: origin.into(),
            version,
            age_ms,
            directory_id: directory,
            parts: vec![value],
        }
    }

    fn down() -> Answer {
        Err(ShardCallError::Failed("connection refused".into()))
    }

    /// x's part, summed, or `None` if it cannot be told.
    fn x_part(answers: &[Answer], views: &[NodeView<'_>]) -> Option<i128> {
        part_of(0, views, answers)
            .ok()
            .map(|lists| lists.iter().map(|list| list[0]).sum())
    }

    #[test]
    fn each_node_part_comes_from_one_place() {
        let y_with_copy = |version, age, directory, value| NodeRead {
            copies: vec![copy("x", version, age, directory, value)],
            ..own(2)
        };
        let handed_over = |version| NodeRead {
            drained_to: Some("y".into()),
            handed_over_version: version,
            ..Default::default()
        };
        let restoring = |directory, value| NodeRead {
            restoring: true,
            directory_id: directory,
            ..own(value)
        };
        let retiring = |value| NodeRead {
            retired: vec!["x".into()],
            ..own(value)
        };
        // (case, x's answer, y's answer, z's answer, coordinator saw x handed
        // over, x's part)
        type Case = (&'static str, Answer, Answer, Answer, bool, Option<i128>);
        let cases: Vec<Case> = vec![
            (
                "answered",
                Ok(own(1)),
                Ok(own(2)),
                Ok(own(3)),
                false,
                Some(1),
            ),
            (
                "answered, a copy elsewhere is ignored",
                Ok(own(1)),
                Ok(y_with_copy(9, Some(10), 1, 50)),
                Ok(own(3)),
                false,
                Some(1),
            ),
            (
                "down: its replica's fresh copy",
                down(),
                Ok(y_with_copy(9, Some(10), 1, 50)),
                Ok(own(3)),
                false,
                Some(50),
            ),
            (
                "down: a stale copy is no answer",
                down(),
                Ok(y_with_copy(9, Some(100), 1, 50)),
                Ok(own(3)),
                false,
                None,
            ),
            (
                "taken over: the stand-in's frozen copy, though it answers",
                Ok(own(1)),
                Ok(NodeRead {
                    standing_in_for: vec!["x".into()],
                    ..y_with_copy(9, None, 1, 50)
                }),
                Ok(own(3)),
                false,
                Some(50),
            ),
            (
                "taken over and down: the frozen copy, whatever its age",
                down(),
                Ok(NodeRead {
                    standing_in_for: vec!["x".into()],
                    ..y_with_copy(9, Some(1_000_000), 1, 50)
                }),
                Ok(own(3)),
                false,
                Some(50),
            ),
            (
                "taken over by a node whose answer lacks the copy: no answer",
                Ok(own(1)),
                Ok(NodeRead {
                    standing_in_for: vec!["x".into()],
                    ..own(2)
                }),
                Ok(own(3)),
                false,
                None,
            ),
            (
                "down: a copy whose age its replica does not know (restarted since) is no answer",
                down(),
                Ok(y_with_copy(9, None, 1, 50)),
                Ok(own(3)),
                false,
                None,
            ),
            (
                "down: a copy on a node that is not its replica is no answer",
                down(),
                Ok(own(2)),
                Ok(NodeRead {
                    copies: vec![copy("x", 9, Some(10), 1, 50)],
                    ..own(3)
                }),
                false,
                None,
            ),
            (
                "down and its replica down",
                down(),
                down(),
                Ok(own(3)),
                false,
                None,
            ),
            (
                "down after it was handed over: only its adopter's answer counts",
                down(),
                Ok(y_with_copy(9, Some(10), 1, 50)),
                Ok(own(3)),
                true,
                None,
            ),
            (
                "handed over, not adopted yet: the adopter's final copy",
                Ok(handed_over(9)),
                Ok(y_with_copy(9, Some(10), 1, 50)),
                Ok(own(3)),
                true,
                Some(50),
            ),
            (
                "handed over: a copy older than the final one is no answer",
                Ok(handed_over(10)),
                Ok(y_with_copy(9, Some(10), 1, 50)),
                Ok(own(3)),
                true,
                None,
            ),
            (
                "handed over and adopted: in the adopter's own",
                Ok(handed_over(9)),
                Ok(retiring(52)),
                Ok(own(3)),
                true,
                Some(0),
            ),
            (
                "handed over: another node's retirement does not count before the adopter's",
                Ok(handed_over(9)),
                Ok(y_with_copy(9, Some(10), 1, 50)),
                Ok(retiring(3)),
                true,
                Some(50),
            ),
            (
                "handed over, its adopter down",
                Ok(handed_over(9)),
                down(),
                Ok(own(3)),
                true,
                None,
            ),
            (
                "retired and gone: listed by any answer",
                down(),
                Ok(own(2)),
                Ok(retiring(3)),
                true,
                Some(0),
            ),
            (
                "restoring: its own plus its lost directory's copy",
                Ok(restoring(2, 1)),
                Ok(y_with_copy(9, Some(100), 1, 50)),
                Ok(own(3)),
                false,
                Some(51),
            ),
            (
                "restoring, and already replicated from its new directory",
                Ok(restoring(2, 1)),
                Ok(y_with_copy(9, Some(100), 2, 51)),
                Ok(own(3)),
                false,
                Some(51),
            ),
            (
                "restoring, no copy anywhere (a new node)",
                Ok(restoring(2, 1)),
                Ok(own(2)),
                Ok(own(3)),
                false,
                Some(1),
            ),
            (
                "restoring, its replica down",
                Ok(restoring(2, 1)),
                down(),
                Ok(own(3)),
                false,
                None,
            ),
        ];
        for (case, x, y, z, handed_over, expected) in cases {
            let answers = [x, y, z];
            assert_eq!(
                x_part(&answers, &views(handed_over, 50)),
                expected,
                "{case}"
            );
        }
    }

    #[test]
    fn the_freshest_of_several_copies_stands_in() {
        let replicas = [1, 2];
        let mut views = views(false, 50);
        views[0].replicas = &replicas;
        let answers = [
            down(),
            Ok(NodeRead {
                copies: vec![copy("x", 7, Some(10), 1, 70)],
                ..own(2)
            }),
            Ok(NodeRead {
                copies: vec![copy("x", 8, Some(10), 1, 80)],
                ..own(3)
            }),
        ];
        assert_eq!(x_part(&answers, &views), Some(80));
        // Only the older copy was reached by a recent round (the newer one's
        // replica restarted since): that round's scan is at or below version
        // 7, so version 8 holds everything it does.
        let answers = [
            down(),
            Ok(NodeRead {
                copies: vec![copy("x", 7, Some(10), 1, 70)],
                ..own(2)
            }),
            Ok(NodeRead {
                copies: vec![copy("x", 8, None, 1, 80)],
                ..own(3)
            }),
        ];
        assert_eq!(x_part(&answers, &views), Some(80));
        let mut none_recent = views.clone();
        none_recent[0].max_copy_age_ms = 5;
        assert_eq!(x_part(&answers, &none_recent), None);
        // The coordinator's own recent round brought z's copy to version 8:
        // z restarted since and knows no age, but the copy is recent enough.
        let mut vouched = none_recent.clone();
        vouched[0].vouched = vec![(2, 8)];
        assert_eq!(x_part(&answers, &vouched), Some(80));
        // A round to version 9 vouches for nothing older.
        vouched[0].vouched = vec![(2, 9)];
        assert_eq!(x_part(&answers, &vouched), None);
        // A recent copy of a new directory of x says nothing of an old
        // directory's copy, whatever its version.
        let answers = [
            down(),
            Ok(NodeRead {
                copies: vec![copy("x", 10, Some(10), 2, 10)],
                ..own(2)
            }),
            Ok(NodeRead {
                copies: vec![copy("x", 5_000, None, 1, 500)],
                ..own(3)
            }),
        ];
        assert_eq!(x_part(&answers, &views), Some(10));
    }

    #[test]
    fn an_answer_from_before_a_reconciliation_is_not_read_with_one_from_after_its_end() {
        let x = |version, directory| {
            Ok(NodeRead {
                version,
                directory_id: directory,
                ..own(1)
            })
        };
        let y_ended = |version, directory| {
            Ok(NodeRead {
                takeovers_ended: vec![crate::model::TakeoverEnded {
                    origin: "x".into(),
                    version,
                    directory_id: directory,
                }],
                ..own(2)
            })
        };
        let views = views(false, 50);
        let straddled = |answers: [Answer; 3]| answered_before_its_reconciliation(&views, &answers);
        assert_eq!(straddled([x(5, 1), y_ended(6, 1), Ok(own(3))]), Some(0));
        // Given after the reconciliation.
        assert_eq!(straddled([x(6, 1), y_ended(6, 1), Ok(own(3))]), None);
        // From another directory (restored since): its versions are not
        // that directory's.
        assert_eq!(straddled([x(5, 2), y_ended(6, 1), Ok(own(3))]), None);
        // Ended before directories were kept.
        assert_eq!(straddled([x(5, 1), y_ended(6, 0), Ok(own(3))]), None);
        // Not answered: its part is a copy, dated by other rules.
        assert_eq!(straddled([down(), y_ended(6, 1), Ok(own(3))]), None);
    }

    #[test]
    fn a_node_without_an_answer_keeps_its_own_error() {
        let answers = [
            Err(ShardCallError::TimedOut(std::time::Duration::from_secs(1))),
            Ok(own(2)),
            Ok(own(3)),
        ];
        assert_eq!(
            part_of(0, &views(false, 0), &answers),
            Err(ShardCallError::TimedOut(std::time::Duration::from_secs(1)))
        );
    }
}
