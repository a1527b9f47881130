//! Which placeable worker hosts which model. Every worker computes the same answer from the
//! same snapshot, so no coordinator is needed: placements are taken in model order, and each
//! takes the eligible workers that rank highest for it (workers already hosting the model
//! first, so a new worker or a restart does not reshuffle running replicas; then by a hash
//! of model and worker id, which spreads models evenly).

use crate::schema::{ModelPhase, Snapshot};
use std::collections::BTreeMap;

/// FNV-1a, stable across builds and platforms (unlike std's hasher).
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// worker id → the model it should host.
pub fn assign(s: &Snapshot) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (model, p) in &s.placements {
        let mut eligible: Vec<(bool, u64, &str)> = s
            .workers
            .values()
            .filter(|w| w.placeable && !s.is_draining(&w.id) && !out.contains_key(&w.id) && p.admits(w))
            // A worker that failed to load this model leaves it to others.
            .filter(|w| !w.model.as_ref().is_some_and(|m| m.id == *model && m.phase == ModelPhase::Failed))
            .map(|w| {
                let hosting = w.model.as_ref().is_some_and(|m| m.id == *model);
                (!hosting, stable_hash(&[model.as_bytes(), w.id.as_bytes()]), w.id.as_str())
            })
            .collect();
        eligible.sort();
        for (_, _, id) in eligible.into_iter().take(p.replicas as usize) {
            out.insert(id.to_string(), model.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::*;

    fn worker(id: &str, labels: &[(&str, &str)], model: Option<(&str, ModelPhase)>) -> WorkerRecord {
        WorkerRecord {
            schema: 1,
            id: id.into(),
            addr: format!("{id}:1"),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            placeable: true,
            model: model.map(|(m, phase)| ModelStatus { id: m.into(), phase, reason: None }),
            max_seqs: 16,
            load: LoadSummary::default(),
        }
    }

    fn placement(model: &str, replicas: u32) -> Placement {
        Placement { schema: 1, model: model.into(), source: model.into(), replicas, workers: vec![], labels: BTreeMap::new(), tensor_parallel: 1 }
    }

    fn snapshot(workers: Vec<WorkerRecord>, placements: Vec<Placement>) -> Snapshot {
        Snapshot {
            workers: workers.into_iter().map(|w| (w.id.clone(), w)).collect(),
            placements: placements.into_iter().map(|p| (p.model.clone(), p)).collect(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn replicas_selectors_drains_and_failures_are_respected() {
        let ws = vec![worker("a", &[("zone", "x")], None), worker("b", &[], None), worker("c", &[("zone", "x")], None), worker("d", &[], None)];
        let mut s = snapshot(ws, vec![placement("m1", 2), placement("m2", 5)]);
        let a = assign(&s);
        assert_eq!(a.values().filter(|m| *m == "m1").count(), 2);
        assert_eq!(a.values().filter(|m| *m == "m2").count(), 2, "the rest go to m2, one model per worker");

        let mut zoned = placement("m1", 5);
        zoned.labels.insert("zone".into(), "x".into());
        s.placements.insert("m1".into(), zoned);
        let a = assign(&s);
        assert_eq!(a.get("a").map(String::as_str), Some("m1"));
        assert_eq!(a.get("c").map(String::as_str), Some("m1"));

        s.drains.insert("a".into());
        assert_ne!(assign(&s).get("a").map(String::as_str), Some("m1"), "drained workers get nothing");
        s.drains.clear();

        s.workers.insert("a".into(), worker("a", &[("zone", "x")], Some(("m1", ModelPhase::Failed))));
        assert_ne!(assign(&s).get("a").map(String::as_str), Some("m1"), "a failed load moves elsewhere");
    }

    #[test]
    fn replicas_stay_put_when_workers_join() {
        let mut s = snapshot(vec![worker("a", &[], None), worker("b", &[], None), worker("c", &[], None)], vec![placement("m", 1)]);
        let first = assign(&s);
        let host = first.keys().next().unwrap().clone();
        s.workers.insert(host.clone(), worker(&host, &[], Some(("m", ModelPhase::Ready))));
        for id in ["d", "e", "f", "g"] {
            s.workers.insert(id.into(), worker(id, &[], None));
            assert_eq!(assign(&s).keys().next(), Some(&host));
        }
    }
}
