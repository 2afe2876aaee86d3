//! What both stores share when they answer a history query: the window of seqs it covers and the direction it is
//! read in, the cut of rows read one past the page, and the message a stored row becomes.
//!
//! It reads no store: each store walks its own layout within the window and keeps its own rows.

use super::{HistoryQuery, StoreError, StoreFault};
use std::collections::BTreeMap;
use switchyard_protocol::client::Message;
use switchyard_protocol::{MessageId, UserId};

/// The seqs a history query covers (`first..=last`), the direction its page is read in (from `after` upwards, else
/// from `before` or the room's end downwards) and the page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageWindow {
    pub first: u64,
    pub last: u64,
    pub ascending: bool,
    pub limit: usize,
}

impl PageWindow {
    /// The window of `query`, up to `last_seq` (`u64::MAX` for a store that does not know it); `None` when the
    /// query covers no seq at all.
    pub fn of(query: &HistoryQuery, last_seq: u64) -> Option<PageWindow> {
        let first = match query.after {
            Some(after) => after.checked_add(1)?,
            None => 1,
        };
        let last = match query.before {
            Some(before) => before.checked_sub(1)?.min(last_seq),
            None => last_seq,
        };
        let window = PageWindow { first, last, ascending: query.after.is_some(), limit: query.limit as usize };
        (first <= last).then_some(window)
    }

    /// How many messages to read: one past the page tells whether more lie beyond it.
    pub fn wanted(&self) -> usize {
        self.limit + 1
    }

    /// The page, in seq order, from the messages read in the window's direction (at most [`Self::wanted`]), and
    /// whether more lie beyond it.
    pub fn finish<T>(&self, mut picked: Vec<T>) -> (Vec<T>, bool) {
        let more = picked.len() > self.limit;
        picked.truncate(self.limit);
        if !self.ascending {
            picked.reverse();
        }
        (picked, more)
    }
}

/// What a store keeps of one message, whatever its layout: the creating `msg`'s fields and what later events made
/// of it.
#[derive(Debug, Clone)]
pub(crate) struct StoredMessage {
    pub seq: u64,
    pub id: MessageId,
    /// The author; `None` once erased (the message is then a tombstone).
    pub from: Option<UserId>,
    /// Create time, microseconds.
    pub ts_us: u64,
    /// `attrs` as JSON text.
    pub attrs: Option<String>,
    pub reply_to: Option<u64>,
    /// The body as it reads now (the latest edit's, else the create's); `None` once deleted.
    pub body: Option<String>,
    /// The latest edit's time, microseconds.
    pub edited_us: Option<u64>,
    pub deleted: bool,
    /// The latest pin event pinned it.
    pub pinned: bool,
}

impl StoredMessage {
    /// The message as history answers it, with its reactions folded in: a deleted message has no body and is not
    /// pinned; one that is not deleted must have a body.
    pub fn into_message(self, reactions: BTreeMap<String, Vec<UserId>>) -> Result<Message, StoreError> {
        let seq = self.seq;
        let attrs = self
            .attrs
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| StoreError::Corrupt(StoreFault::caused(&format!("undecodable attrs at seq {seq}"), e)))?;
        // An erased author's message is a tombstone whatever else the row says.
        let erased = self.from.is_none();
        let deleted = self.deleted || erased;
        let attrs = if erased { None } else { attrs };
        if !deleted && self.body.is_none() {
            let message = format!("message at seq {seq} has no body and is not deleted");
            return Err(StoreError::Corrupt(StoreFault::new(message)));
        }
        Ok(Message {
            seq,
            id: self.id,
            from: self.from,
            body: if deleted { None } else { self.body },
            attrs,
            reply_to: self.reply_to,
            ts: self.ts_us / 1000,
            edited_ts: if erased { None } else { self.edited_us.map(|us| us / 1000) },
            deleted,
            reactions,
            pinned: self.pinned && !deleted,
            reply_count: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_protocol::{ProjectId, RoomId};

    fn query(before: Option<u64>, after: Option<u64>, limit: u32) -> HistoryQuery {
        HistoryQuery {
            tenant: ProjectId::parse("pj_0123456789abcdefghij").unwrap(),
            room: RoomId::parse("general").unwrap(),
            before,
            after,
            limit,
        }
    }

    #[test]
    fn windows_cover_what_the_query_names_and_nothing_when_it_names_nothing() {
        let latest = PageWindow::of(&query(None, None, 10), 40).unwrap();
        assert_eq!(latest, PageWindow { first: 1, last: 40, ascending: false, limit: 10 });
        let older = PageWindow::of(&query(Some(20), None, 5), 40).unwrap();
        assert_eq!((older.first, older.last, older.ascending), (1, 19, false));
        let newer = PageWindow::of(&query(None, Some(20), 5), u64::MAX).unwrap();
        assert_eq!((newer.first, newer.last, newer.ascending), (21, u64::MAX, true));
        let between = PageWindow::of(&query(Some(30), Some(20), 5), 40).unwrap();
        assert_eq!((between.first, between.last, between.ascending), (21, 29, true));
        assert_eq!(PageWindow::of(&query(Some(0), None, 5), 40), None);
        assert_eq!(PageWindow::of(&query(Some(1), None, 5), 40), None);
        assert_eq!(PageWindow::of(&query(None, Some(u64::MAX), 5), u64::MAX), None);
        assert_eq!(PageWindow::of(&query(Some(21), Some(20), 5), 40), None);
        assert_eq!(PageWindow::of(&query(None, Some(40), 5), 40), None);
    }

    #[test]
    fn a_page_is_cut_to_its_size_and_put_in_seq_order() {
        let down = PageWindow { first: 1, last: 9, ascending: false, limit: 3 };
        assert_eq!(down.finish(vec![9, 8, 7, 6]), (vec![7, 8, 9], true));
        assert_eq!(down.finish(vec![2, 1]), (vec![1, 2], false));
        let up = PageWindow { ascending: true, ..down };
        assert_eq!(up.finish(vec![1, 2, 3]), (vec![1, 2, 3], false));
        assert_eq!(up.finish(vec![1, 2, 3, 4]), (vec![1, 2, 3], true));
    }

    #[test]
    fn a_deleted_message_has_no_body_and_no_pin_and_a_live_one_needs_a_body() {
        let stored = StoredMessage {
            seq: 4,
            id: MessageId::generate(1),
            from: Some(UserId::parse("ada").unwrap()),
            ts_us: 2_000,
            attrs: Some(r#"{"k":1}"#.into()),
            reply_to: None,
            body: Some("hi".into()),
            edited_us: Some(3_000),
            deleted: false,
            pinned: true,
        };
        let message = stored.clone().into_message(BTreeMap::new()).unwrap();
        assert_eq!(
            (message.body.as_deref(), message.ts, message.edited_ts, message.pinned),
            (Some("hi"), 2, Some(3), true)
        );
        let erased = StoredMessage { from: None, ..stored.clone() }.into_message(BTreeMap::new()).unwrap();
        assert_eq!(
            (erased.from, erased.body, erased.attrs, erased.edited_ts, erased.deleted, erased.pinned),
            (None, None, None, None, true, false),
            "an erased author's message is a tombstone that keeps nothing of theirs"
        );
        let gone = StoredMessage { deleted: true, ..stored.clone() }.into_message(BTreeMap::new()).unwrap();
        assert_eq!((gone.body, gone.pinned), (None, false));
        assert!(StoredMessage { body: None, ..stored.clone() }.into_message(BTreeMap::new()).is_err());
        assert!(StoredMessage { attrs: Some("{".into()), ..stored }.into_message(BTreeMap::new()).is_err());
    }
}
