//! Layout migrations at open. Version 5 ([`to_layout_5`]): RUNNING sessions' `T` keys take the
//! code of PENDING ones, and the `G` index is removed. Version 4 ([`drop_lease_keys`]): the lease index `L` moved to
//! memory, and an older store's `L` keys are removed.
//!
//! Layout version 3: session keys carry their tenant. Keys written by layout 2 and before name a
//! session by its id alone (`S id`, index keys ending in `id`, data keys `tag lp(id) ...`); from
//! version 3 a session is `lp(tenant) id` (`tag lp(tenant) lp(id) ...` in data keys), and the
//! sessions of an older store go to the single namespace (tenant `""`).
//!
//! The migration runs at open, before anything else reads the store, in chunks: each chunk is one
//! atomic sled batch that writes the new keys and removes the old ones, and the layout version is
//! written last. A migration killed part-way is resumed by the next open: a key already in the
//! new form is told apart from an old one (an id never starts with a `\0` byte, and an old data
//! key's `lp(id)` never has length 0) and left alone.

use super::keys::split_lp;
use super::sled_err;
use crate::store::StoreResult;

/// Keys moved per batch: bounds one batch's memory on a store of millions of keys.
const CHUNK: usize = 10_000;

/// The empty tenant's `lp("")`.
const NO_TENANT: [u8; 4] = [0; 4];

/// Tags of per-session data keyspaces (`tag lp(id) ...`).
const DATA_TAGS: &[u8] = b"ERBJKUIOHFQV";

/// Where the session id starts in an index key of layout 2, or `None` for a key that is not a
/// session key (meta, agents) or cannot be parsed.
fn id_offset(k: &[u8]) -> Option<usize> {
    let lp_len = |at: usize| -> Option<usize> {
        let (s, _) = split_lp(k.get(at..)?)?;
        Some(4 + s.len())
    };
    match *k.first()? {
        b'S' | b'Z' => Some(1),
        b'W' | b'P' => Some(1 + 8 + 8 + 4),
        b'G' | b'L' | b'X' => Some(1 + 8),
        b'T' => Some(1 + 1 + 8),
        b'C' | b'A' => Some(1 + lp_len(1)? + 8),
        b'Y' => {
            let first = lp_len(1)?;
            Some(1 + first + lp_len(1 + first)?)
        }
        _ => None,
    }
}

/// The layout-3 key of a layout-2 key, or `None` when `k` needs no change (already layout 3, or
/// not a session key).
pub(super) fn upgraded(k: &[u8]) -> Option<Vec<u8>> {
    let tag = *k.first()?;
    if DATA_TAGS.contains(&tag) {
        // Old: tag lp(id) rest, with a non-empty id; new: tag lp(tenant) lp(id) rest.
        let len = k.get(1..5)?;
        if len == NO_TENANT {
            return None;
        }
        let mut out = Vec::with_capacity(k.len() + 4);
        out.push(tag);
        out.extend_from_slice(&NO_TENANT);
        out.extend_from_slice(&k[1..]);
        return Some(out);
    }
    let at = id_offset(k)?;
    // An id starts with one of [A-Za-z0-9._:-]; lp(tenant) with a 0 byte.
    if *k.get(at)? == 0 {
        return None;
    }
    let mut out = Vec::with_capacity(k.len() + 4);
    out.extend_from_slice(&k[..at]);
    out.extend_from_slice(&NO_TENANT);
    out.extend_from_slice(&k[at..]);
    Some(out)
}

/// Moves every layout-2 session key to its layout-3 form (see the module doc); returns how many
/// keys moved. The caller writes the new layout version once this returns.
pub(super) fn to_tenant_keys(db: &sled::Db) -> StoreResult<u64> {
    let mut moved = 0u64;
    // The first key not yet looked at: every key before it is in the new form.
    let mut from: Vec<u8> = vec![b'A'];
    loop {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        let mut next = None;
        for kv in db.range(from.clone()..) {
            let (k, v) = kv.map_err(sled_err("reading keys to upgrade the layout"))?;
            if n >= CHUNK {
                next = Some(k.to_vec());
                break;
            }
            if let Some(new) = upgraded(&k) {
                batch.insert(new, v);
                batch.remove(k);
                n += 1;
            }
        }
        if n > 0 {
            db.apply_batch(batch)
                .map_err(sled_err("writing upgraded keys"))?;
            moved += n as u64;
            tracing::info!(
                keys = moved,
                "upgrading the store layout to tenant-scoped keys"
            );
        }
        match next {
            Some(k) => from = k,
            None => break,
        }
    }
    db.flush()
        .map_err(sled_err("flushing the upgraded layout"))?;
    Ok(moved)
}

/// Removes every key under `prefix` in chunks of [`CHUNK`]; how many there were.
fn remove_prefix(db: &sled::Db, prefix: &[u8], what: &'static str) -> StoreResult<usize> {
    let mut removed = 0usize;
    loop {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in db.scan_prefix(prefix).take(CHUNK) {
            batch.remove(kv.map_err(sled_err(what))?.0);
            n += 1;
        }
        if n == 0 {
            return Ok(removed);
        }
        db.apply_batch(batch).map_err(sled_err(what))?;
        removed += n;
    }
}

/// Layout 4: removes the lease index `L` (kept in memory from this layout on), in chunks. Resumed
/// by the next open if killed part-way (the layout version is written after it).
pub(super) fn drop_lease_keys(db: &sled::Db) -> StoreResult<()> {
    let removed = remove_prefix(db, b"L", "removing the lease index")?;
    if removed > 0 {
        tracing::info!(
            keys = removed,
            "store layout upgraded: the lease index is kept in memory"
        );
    }
    Ok(())
}

/// Layout 5: moves the `T` keys of RUNNING sessions to the code they share with PENDING ones
/// ([`t_code`](super::keys::t_code)) and removes the `G` index (a listing of every session merges
/// the `T` codes instead), in chunks, then recounts the RUNNING sessions ([`recount_running`]).
/// Resumed by the next open if killed part-way (the layout version is written after it; a moved
/// key is no longer under the old prefix).
pub(super) fn to_layout_5(db: &sled::Db) -> StoreResult<()> {
    use crate::session::SessionStatus;
    let old_prefix = [b'T', SessionStatus::Running.code()];
    let new_code = super::keys::t_code(SessionStatus::Running);
    let mut moved = 0usize;
    loop {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in db.scan_prefix(old_prefix).take(CHUNK) {
            let (k, _) = kv.map_err(sled_err("reading the RUNNING sessions' index keys"))?;
            let mut new = k.to_vec();
            new[1] = new_code;
            batch.insert(new, sled::IVec::default());
            batch.remove(k);
            n += 1;
        }
        if n == 0 {
            break;
        }
        db.apply_batch(batch)
            .map_err(sled_err("moving the RUNNING sessions' index keys"))?;
        moved += n;
    }
    let removed = remove_prefix(db, b"G", "removing the index of all sessions")?;
    recount_running(db)?;
    if moved + removed > 0 {
        tracing::info!(
            moved,
            removed,
            "store layout upgraded: RUNNING sessions share the active index key, and the index of \
             all sessions is gone"
        );
    }
    Ok(())
}

/// Layout 5's open finds the RUNNING sessions by their count (`SledStore::load_leases` stops
/// once it has found as many as `\0counters` says), where earlier layouts scanned a prefix of
/// their own. So the upgrade counts them (one pass over the active `T` code, once) and corrects
/// the counter, rather than trusting a count no earlier open depended on.
fn recount_running(db: &sled::Db) -> StoreResult<()> {
    use super::keys::{id_after, k_session, show_key, t_code};
    use super::{COUNTERS_KEY, Counters};
    use crate::session::SessionStatus;
    use crate::store::codec;
    let running = SessionStatus::Running.code() as usize;
    let mut n = 0u64;
    for kv in db.scan_prefix([b'T', t_code(SessionStatus::Running)]) {
        let (k, _) = kv.map_err(sled_err("reading the active sessions"))?;
        let Ok(id) = id_after(&k, 2 + 8) else {
            continue;
        };
        let Some(v) = db
            .get(k_session(&id))
            .map_err(sled_err("reading the active sessions"))?
        else {
            continue;
        };
        if codec::decode_session(&|| show_key(&k), &v)
            .is_ok_and(|s| s.status == SessionStatus::Running)
        {
            n += 1;
        }
    }
    // A missing counters key is reported by the open that follows.
    let Some(v) = db
        .get(COUNTERS_KEY)
        .map_err(sled_err("reading the counters"))?
    else {
        return Ok(());
    };
    let mut c: Counters = codec::decode(&|| "\\0counters".into(), &v)?;
    if c.by_status[running] != n {
        tracing::warn!(
            counted = n,
            recorded = c.by_status[running],
            "the count of RUNNING sessions was off; corrected"
        );
        c.by_status[running] = n;
        db.insert(COUNTERS_KEY, codec::encode(&c)?)
            .map_err(sled_err("correcting the counters"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_keys_gain_the_empty_tenant_and_new_ones_stay() {
        let s_old = b"Sab".to_vec();
        let s_new = upgraded(&s_old).expect("old");
        assert_eq!(s_new, b"S\0\0\0\0ab".to_vec());
        assert_eq!(upgraded(&s_new), None);
        let mut c_old = vec![b'C', 0, 0, 0, 2, b'c', b'1'];
        c_old.extend_from_slice(&[9; 8]);
        c_old.extend_from_slice(b"id1");
        let c_new = upgraded(&c_old).expect("old");
        assert_eq!(&c_new[..15], &c_old[..15]);
        assert_eq!(&c_new[15..], b"\0\0\0\0id1");
        assert_eq!(upgraded(&c_new), None);
        let r_old = [b'R', 0, 0, 0, 2, b'a', b'b', 0, 0, 0, 0, 0, 0, 0, 7];
        let r_new = upgraded(&r_old).expect("old");
        assert_eq!(&r_new[..5], &[b'R', 0, 0, 0, 0]);
        assert_eq!(&r_new[5..], &r_old[1..]);
        assert_eq!(upgraded(&r_new), None);
        assert_eq!(upgraded(b"\0meta"), None);
        assert_eq!(upgraded(b"N\0\0\0\x01cname"), None);
    }
}
