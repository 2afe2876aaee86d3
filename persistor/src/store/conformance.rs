//! The conformance suite every `HistoryStore` backend must pass: ordering, paging with exact `more` across
//! buckets (including messages millions of seqs apart), idempotent and order-insensitive apply, edit/delete/reaction
//! and pin folding, threads and reply counts, the room head, and tenant and room isolation.
//!
//! Each case works in fresh random tenants, so the suite can run again and again against the same database. Cases
//! panic on the first mismatch (they are meant to be called from tests); they do not clean up what they wrote and
//! do not test backend-specific failure modes such as outages.

use super::{HistoryPage, HistoryQuery, HistoryStore, RoomHead, StoreError};
use serde_json::json;
use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use switchyard_protocol::client::Message;
use switchyard_protocol::internal::{EventBody, RoomEvent, INTERNAL_VERSION};
use switchyard_protocol::{MessageId, ProjectId, RoomId, UserId};

/// Event time of seq 0 in every case's rooms; seq `n` happens `n` milliseconds (plus a few microseconds) later.
const BASE_TS_US: u64 = 1_750_000_000_000_000;

/// Run every case, one after the other.
pub async fn run_all<S: HistoryStore>(store: &S) {
    empty_room(store).await;
    invalid_limit(store).await;
    apply_and_history_order(store).await;
    query_bounds(store).await;
    joined_left_advance_last_seq(store).await;
    room_head(store).await;
    edit_delete_reaction(store).await;
    early_edit_delete_reaction(store).await;
    pin_unpin_delete(store).await;
    threads(store).await;
    reply_counts_stop_at_their_bound(store).await;
    a_deleted_room_keeps_nothing_from_before(store).await;
    expired_messages_are_never_read(store).await;
    an_erased_user_leaves_tombstones(store).await;
    idempotent_out_of_order(store).await;
    tenant_isolation(store).await;
    room_isolation(store).await;
    paging_across_buckets(store).await;
    messages_far_apart(store).await;
    rejects_out_of_range_values(store).await;
}

/// The `ts_us` of seq `seq` in the suite's rooms: strictly increasing, a distinct millisecond per seq.
pub fn ts_us_of(seq: u64) -> u64 {
    BASE_TS_US + seq * 1_000 + 7
}

fn user(name: &str) -> UserId {
    UserId::parse(name).expect("valid user id")
}

fn room_id(name: &str) -> RoomId {
    RoomId::parse(name).expect("valid room id")
}

/// Builds the events of one room of one tenant.
#[derive(Debug, Clone)]
struct Room {
    /// The tenant the room belongs to.
    tenant: ProjectId,
    /// The room.
    room: RoomId,
}

impl Room {
    fn new(tenant: &ProjectId, room: &str) -> Self {
        Room { tenant: tenant.clone(), room: room_id(room) }
    }

    fn fresh(room: &str) -> Self {
        Room::new(&ProjectId::generate(), room)
    }

    fn event(&self, seq: u64, body: EventBody) -> RoomEvent {
        RoomEvent {
            v: INTERNAL_VERSION,
            tenant: self.tenant.clone(),
            room: self.room.clone(),
            seq,
            ts_us: ts_us_of(seq),
            tally: Default::default(),
            expires_ms: None,
            body,
        }
    }

    fn msg(&self, seq: u64, from: &str, body: &str) -> RoomEvent {
        self.msg_full(seq, from, body, None, None)
    }

    fn msg_full(
        &self,
        seq: u64,
        from: &str,
        body: &str,
        attrs: Option<serde_json::Value>,
        reply_to: Option<u64>,
    ) -> RoomEvent {
        self.event(
            seq,
            EventBody::Msg {
                id: MessageId::generate(ts_us_of(seq) / 1000),
                from: user(from),
                body: body.to_owned(),
                attrs,
                reply_to,
            },
        )
    }

    fn edit(&self, seq: u64, target: u64, from: &str, body: &str) -> RoomEvent {
        self.event(seq, EventBody::Edit { target, from: user(from), body: body.to_owned() })
    }

    fn delete(&self, seq: u64, target: u64, by: &str) -> RoomEvent {
        self.event(seq, EventBody::Delete { target, by: user(by) })
    }

    fn react(&self, seq: u64, target: u64, who: &str, emoji: &str, removed: bool) -> RoomEvent {
        self.event(seq, EventBody::Reaction { target, user: user(who), emoji: emoji.to_owned(), removed })
    }

    fn pin(&self, seq: u64, target: u64, by: &str, pinned: bool) -> RoomEvent {
        self.event(seq, EventBody::Pin { target, by: user(by), pinned })
    }

    fn joined(&self, seq: u64, who: &str) -> RoomEvent {
        self.event(seq, EventBody::Joined { user: user(who) })
    }

    fn left(&self, seq: u64, who: &str, by: Option<&str>) -> RoomEvent {
        self.event(seq, EventBody::Left { user: user(who), by: by.map(user) })
    }

    fn query(&self, before: Option<u64>, after: Option<u64>, limit: u32) -> HistoryQuery {
        HistoryQuery { tenant: self.tenant.clone(), room: self.room.clone(), before, after, limit }
    }

    async fn apply<S: HistoryStore>(&self, store: &S, events: &[RoomEvent]) {
        if let Err(e) = store.apply(events).await {
            panic!("apply of {} events to {}/{} failed: {e}", events.len(), self.tenant, self.room);
        }
    }

    async fn page<S: HistoryStore>(
        &self,
        store: &S,
        before: Option<u64>,
        after: Option<u64>,
        limit: u32,
    ) -> HistoryPage {
        match store.history(&self.query(before, after, limit)).await {
            Ok(page) => page,
            Err(e) => panic!(
                "history of {}/{} before={before:?} after={after:?} limit={limit} failed: {e}",
                self.tenant, self.room
            ),
        }
    }

    async fn latest<S: HistoryStore>(&self, store: &S) -> HistoryPage {
        self.page(store, None, None, 100).await
    }

    async fn head<S: HistoryStore>(&self, store: &S) -> RoomHead {
        match store.head(&self.tenant, &self.room).await {
            Ok(head) => head,
            Err(e) => panic!("head of {}/{} failed: {e}", self.tenant, self.room),
        }
    }

    async fn last_seq<S: HistoryStore>(&self, store: &S) -> u64 {
        match store.last_seq(&self.tenant, &self.room).await {
            Ok(seq) => seq,
            Err(e) => panic!("last_seq of {}/{} failed: {e}", self.tenant, self.room),
        }
    }
}

/// The message a `msg` event creates, before any edit, delete or reaction.
fn created(event: &RoomEvent) -> Message {
    match &event.body {
        EventBody::Msg { id, from, body, attrs, reply_to } => Message {
            seq: event.seq,
            id: id.clone(),
            from: Some(from.clone()),
            body: Some(body.clone()),
            attrs: attrs.clone(),
            reply_to: *reply_to,
            ts: event.ts_ms(),
            edited_ts: None,
            deleted: false,
            reactions: BTreeMap::new(),
            pinned: false,
            reply_count: 0,
        },
        other @ (EventBody::Edit { .. }
        | EventBody::Delete { .. }
        | EventBody::Reaction { .. }
        | EventBody::Pin { .. }
        | EventBody::Joined { .. }
        | EventBody::Left { .. }
        | EventBody::Moderation { .. }
        | EventBody::RoomDeleted {}
        | EventBody::UserErased { .. }) => panic!("conformance bug: {other:?} is not a msg"),
    }
}

fn seqs(page: &HistoryPage) -> Vec<u64> {
    page.messages.iter().map(|m| m.seq).collect()
}

fn reactions(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<UserId>> {
    pairs.iter().map(|(emoji, users)| ((*emoji).to_owned(), users.iter().map(|u| user(u)).collect())).collect()
}

/// What a store must answer for `query` when the room holds exactly `all` (ascending by seq).
fn reference_page(all: &[Message], before: Option<u64>, after: Option<u64>, limit: u32) -> HistoryPage {
    let limit = limit as usize;
    let in_range: Vec<&Message> =
        all.iter().filter(|m| after.is_none_or(|a| m.seq > a) && before.is_none_or(|b| m.seq < b)).collect();
    let (picked, more): (Vec<&Message>, bool) = if after.is_some() {
        (in_range.iter().take(limit).copied().collect(), in_range.len() > limit)
    } else {
        let skip = in_range.len().saturating_sub(limit);
        (in_range[skip..].to_vec(), skip > 0)
    };
    HistoryPage { messages: picked.into_iter().cloned().collect(), more }
}

/// A small xorshift generator, so the suite needs no extra dependency; the seed is printed on failure.
#[derive(Debug, Clone)]
struct Rng {
    /// The generator's state; never zero.
    state: u64,
}

impl Rng {
    fn seeded(seed: u64) -> Self {
        Rng { state: seed.max(1) }
    }

    fn random() -> Self {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(ts_us_of(0));
        Rng::seeded(hasher.finish())
    }

    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    /// Uniform-enough in `0..n`; `n` must be positive.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// A room with no events: an empty page without `more`, whatever the bounds, and last seq 0.
pub async fn empty_room<S: HistoryStore>(store: &S) {
    let room = Room::fresh("empty");
    for (before, after) in [(None, None), (Some(10), None), (None, Some(0)), (Some(10), Some(2))] {
        let page = room.page(store, before, after, 50).await;
        assert!(page.messages.is_empty() && !page.more, "empty room, before={before:?} after={after:?}: got {page:?}");
    }
    assert_eq!(room.last_seq(store).await, 0, "empty room last_seq");
}

/// A limit outside 1..=100 is refused as an invalid query.
pub async fn invalid_limit<S: HistoryStore>(store: &S) {
    let room = Room::fresh("limits");
    for limit in [0, 101, u32::MAX] {
        match store.history(&room.query(None, None, limit)).await {
            Err(StoreError::InvalidQuery(_)) => {}
            other => panic!("limit {limit} should be an invalid query, got {other:?}"),
        }
    }
    assert!(store.history(&room.query(None, None, 100)).await.is_ok());
    assert!(store.history(&room.query(None, None, 1)).await.is_ok());
}

/// Messages come back ascending by seq with every field intact; `limit` keeps the latest; last_seq follows.
pub async fn apply_and_history_order<S: HistoryStore>(store: &S) {
    let room = Room::fresh("general");
    let mut events = Vec::new();
    for seq in 1..=10 {
        let ev = match seq {
            3 => room.msg_full(
                seq,
                "bob",
                "re: ünïcødé 🎉 \"quotes\" \\ and\nnewlines",
                Some(json!({"kind": "reply", "n": 3, "f": 0.5, "nested": {"list": [1, "two", null, true]}})),
                Some(1),
            ),
            _ => room.msg(seq, if seq % 2 == 0 { "bob" } else { "alice" }, &format!("message {seq}")),
        };
        events.push(ev);
    }
    // Apply newest first, in two batches, to show that order of arrival does not matter for ordering.
    let mut reversed = events.clone();
    reversed.reverse();
    room.apply(store, &reversed[..4]).await;
    room.apply(store, &reversed[4..]).await;

    let mut expected: Vec<Message> = events.iter().map(created).collect();
    expected[0].reply_count = 1; // seq 3 replies to it
    let page = room.latest(store).await;
    assert_eq!(page.messages, expected, "all ten messages, ascending, fields intact");
    assert!(!page.more, "ten messages fit a page of 100");

    let page = room.page(store, None, None, 3).await;
    assert_eq!(seqs(&page), vec![8, 9, 10], "latest three");
    assert!(page.more, "earlier messages exist before seq 8");

    let page = room.page(store, None, Some(0), 4).await;
    assert_eq!(seqs(&page), vec![1, 2, 3, 4], "first four");
    assert!(page.more, "later messages exist after seq 4");

    assert_eq!(room.last_seq(store).await, 10);
}

/// Bounds at and beyond the edges: before/after at the extremes, empty ranges, one-message ranges.
pub async fn query_bounds<S: HistoryStore>(store: &S) {
    let room = Room::fresh("bounds");
    let events: Vec<RoomEvent> = (1..=5).map(|s| room.msg(s, "alice", &format!("b{s}"))).collect();
    room.apply(store, &events).await;
    let all: Vec<Message> = events.iter().map(created).collect();

    let cases: [(Option<u64>, Option<u64>, u32); 14] = [
        (Some(u64::MAX), None, 10),
        (None, Some(u64::MAX), 10),
        (None, Some(u64::MAX - 1), 10),
        (Some(u64::MAX), Some(0), 10),
        (Some(1), None, 10),
        (Some(0), None, 10),
        (Some(5), Some(4), 10),
        (Some(3), Some(4), 10),
        (Some(5), Some(3), 10),
        (Some(6), Some(0), 5),
        (Some(6), Some(0), 4),
        (None, Some(5), 10),
        (None, Some(4), 1),
        (Some(3), None, 2),
    ];
    for (before, after, limit) in cases {
        let got = room.page(store, before, after, limit).await;
        let want = reference_page(&all, before, after, limit);
        assert_eq!(got, want, "bounds: before={before:?} after={after:?} limit={limit}");
    }
}

/// `joined` and `left` count for last_seq but never show in history, and do not confuse paging.
pub async fn joined_left_advance_last_seq<S: HistoryStore>(store: &S) {
    let room = Room::fresh("lobby");
    let m1 = room.msg(1, "alice", "hi");
    let m4 = room.msg(4, "bob", "hello");
    let events = [
        m1.clone(),
        room.joined(2, "bob"),
        room.left(3, "carol", Some("alice")),
        m4.clone(),
        room.joined(5, "dave"),
        room.left(6, "dave", None),
    ];
    room.apply(store, &events[..5]).await;
    assert_eq!(room.last_seq(store).await, 5, "a trailing joined counts for last_seq");
    room.apply(store, &events[5..]).await;
    assert_eq!(room.last_seq(store).await, 6, "a trailing left counts for last_seq");

    let page = room.latest(store).await;
    assert_eq!(page.messages, vec![created(&m1), created(&m4)]);
    assert!(!page.more);

    let page = room.page(store, None, None, 1).await;
    assert_eq!(seqs(&page), vec![4]);
    assert!(page.more, "seq 1 is earlier");
    let page = room.page(store, Some(4), None, 1).await;
    assert_eq!(seqs(&page), vec![1]);
    assert!(!page.more, "nothing before seq 1");
    let page = room.page(store, None, Some(1), 1).await;
    assert_eq!(seqs(&page), vec![4]);
    assert!(!page.more, "only joins and lefts after seq 4");
    let page = room.page(store, None, Some(4), 10).await;
    assert!(page.messages.is_empty() && !page.more, "nothing after seq 4: {page:?}");

    // A room with only membership events has a last seq but no history.
    let quiet = Room::fresh("quiet");
    quiet.apply(store, &[quiet.joined(1, "a"), quiet.joined(2, "b")]).await;
    assert_eq!(quiet.last_seq(store).await, 2);
    let page = quiet.latest(store).await;
    assert!(page.messages.is_empty() && !page.more, "{page:?}");
}

/// The head of a room is the highest seq of any event applied and that event's time: (0, 0) for an unknown room;
/// events applied out of order and again leave the highest; a join, a leave, a reaction, an edit or a delete
/// advances it as a message does.
pub async fn room_head<S: HistoryStore>(store: &S) {
    let head = |event: &RoomEvent| RoomHead { last_seq: event.seq, last_ts_us: event.ts_us };
    let room = Room::fresh("head");
    assert_eq!(room.head(store).await, RoomHead { last_seq: 0, last_ts_us: 0 }, "unknown room");

    let early = [
        room.msg(1, "alice", "one"),
        room.msg(2, "bob", "two"),
        room.joined(3, "carol"),
        room.msg(4, "carol", "four"),
        room.msg(5, "alice", "five"),
    ];
    // Out of order, the newest in the middle of its batch.
    room.apply(store, &[early[1].clone(), early[4].clone(), early[0].clone()]).await;
    assert_eq!(room.head(store).await, head(&early[4]), "the highest seq of a shuffled batch");
    // Older events, one repeated, after the newest: nothing moves back.
    room.apply(store, &[early[3].clone(), early[2].clone(), early[4].clone(), early[1].clone()]).await;
    assert_eq!(room.head(store).await, head(&early[4]), "older and repeated events keep the head");

    // Every kind of event advances it, one batch each.
    let later = [
        room.joined(6, "dave"),
        room.left(7, "dave", Some("alice")),
        room.react(8, 1, "bob", "👍", false),
        room.edit(9, 1, "alice", "one, edited"),
        room.delete(10, 2, "bob"),
        room.react(11, 4, "bob", "👍", true),
        room.msg(12, "carol", "twelve"),
    ];
    for event in &later {
        room.apply(store, std::slice::from_ref(event)).await;
        assert_eq!(room.head(store).await, head(event), "after {:?}", event.body);
        assert_eq!(room.last_seq(store).await, event.seq);
    }

    // Everything again, newest first and twice over: the head stays.
    let mut replay: Vec<RoomEvent> = early.iter().chain(later.iter()).cloned().collect();
    replay.reverse();
    room.apply(store, &replay).await;
    room.apply(store, &replay).await;
    assert_eq!(room.head(store).await, head(&later[6]), "replay keeps the head");

    // A room that only ever saw non-message events has a head all the same; its neighbour has none.
    let quiet = Room::new(&room.tenant, "head-quiet");
    let quiet_events = [quiet.left(4, "erin", None), quiet.joined(3, "erin")];
    quiet.apply(store, &quiet_events).await;
    assert_eq!(quiet.head(store).await, head(&quiet_events[0]), "a trailing left is the head");
    assert_eq!(Room::new(&room.tenant, "head-none").head(store).await, RoomHead::default());
}

/// Edits replace the body (the latest edit wins), deletes leave a tombstone, reactions are last-writer-wins per
/// (message, emoji, user) and fold into sorted user lists with empty emojis omitted.
pub async fn edit_delete_reaction<S: HistoryStore>(store: &S) {
    let room = Room::fresh("folding");
    let m1 = room.msg(1, "alice", "hello");
    let m4 = room.msg_full(4, "bob", "regret", Some(json!({"a": 1})), Some(1));
    let m6 = room.msg(6, "carol", "react to me");
    let events = vec![
        m1.clone(),
        room.edit(2, 1, "alice", "hello v2"),
        room.edit(3, 1, "alice", "hello v3"),
        m4.clone(),
        room.delete(5, 4, "bob"),
        m6.clone(),
        room.react(7, 6, "alice", "👍", false),
        room.react(8, 6, "bob", "👍", false),
        room.react(9, 6, "alice", "👍", true),
        room.react(10, 6, "carol", "🎉", false),
        room.react(11, 6, "carol", "🎉", true),
        room.react(12, 6, "Zed", "👍", false),
        room.react(13, 6, "bob", "❤", false),
        room.react(14, 6, "alice", "👍", false),
        room.react(15, 6, "bob", "👍", true),
        room.react(16, 1, "dave", "👀", false),
    ];
    // One event per batch, in seq order: the plain live path.
    for ev in &events {
        room.apply(store, std::slice::from_ref(ev)).await;
    }

    let mut e1 = created(&m1);
    e1.body = Some("hello v3".into());
    e1.edited_ts = Some(ts_us_of(3) / 1000);
    e1.reactions = reactions(&[("👀", &["dave"])]);
    e1.reply_count = 1; // m4, deleted, still counts
    let mut e4 = created(&m4);
    e4.body = None;
    e4.deleted = true;
    let mut e6 = created(&m6);
    // "Zed" sorts before "alice" by byte order.
    e6.reactions = reactions(&[("❤", &["bob"]), ("👍", &["Zed", "alice"])]);

    let page = room.latest(store).await;
    assert_eq!(page.messages, vec![e1, e4, e6], "edits, tombstone and reactions folded in");
    assert!(!page.more);
    assert_eq!(room.last_seq(store).await, 16);
}

/// Edits, deletes and reactions that arrive before their message take effect once it arrives; a replayed create
/// never undoes them; an older edit or reaction arriving late never overrides a newer one.
pub async fn early_edit_delete_reaction<S: HistoryStore>(store: &S) {
    // Edit before create: invisible until the create, then the create does not undo it.
    let room = Room::fresh("early-edit");
    let m1 = room.msg(1, "alice", "original");
    room.apply(store, &[room.edit(3, 1, "alice", "v3")]).await;
    let page = room.latest(store).await;
    assert!(page.messages.is_empty() && !page.more, "an edit alone is not a message: {page:?}");
    assert_eq!(room.last_seq(store).await, 3);
    room.apply(store, std::slice::from_ref(&m1)).await;
    room.apply(store, &[room.edit(2, 1, "alice", "v2")]).await;
    let mut want = created(&m1);
    want.body = Some("v3".into());
    want.edited_ts = Some(ts_us_of(3) / 1000);
    let page = room.latest(store).await;
    assert_eq!(page.messages, vec![want.clone()], "create after edit keeps the edit; older edit loses");
    room.apply(store, &[m1.clone(), m1.clone()]).await;
    assert_eq!(room.latest(store).await.messages, vec![want], "replayed create changes nothing");

    // Delete before create: the message arrives already a tombstone.
    let room = Room::fresh("early-delete");
    let m1 = room.msg(1, "bob", "oops");
    room.apply(store, &[room.delete(2, 1, "bob")]).await;
    assert!(room.latest(store).await.messages.is_empty());
    room.apply(store, std::slice::from_ref(&m1)).await;
    let mut want = created(&m1);
    want.body = None;
    want.deleted = true;
    assert_eq!(room.latest(store).await.messages, vec![want.clone()]);
    // An edit after the delete (the router refuses these, but a store must stay sane) leaves a bodiless tombstone.
    room.apply(store, &[room.edit(3, 1, "bob", "late edit"), m1.clone()]).await;
    let page = room.latest(store).await;
    assert_eq!(page.messages.len(), 1);
    assert!(page.messages[0].deleted && page.messages[0].body.is_none(), "{page:?}");

    // Reactions before create, and remove before add.
    let room = Room::fresh("early-react");
    let m1 = room.msg(1, "carol", "react early");
    room.apply(store, &[room.react(3, 1, "dave", "🔥", true), room.react(4, 1, "erin", "🔥", false)]).await;
    room.apply(store, &[room.react(2, 1, "dave", "🔥", false)]).await;
    assert!(room.latest(store).await.messages.is_empty());
    room.apply(store, std::slice::from_ref(&m1)).await;
    let mut want = created(&m1);
    want.reactions = reactions(&[("🔥", &["erin"])]);
    assert_eq!(
        room.latest(store).await.messages,
        vec![want],
        "the later remove beats the earlier add whatever the arrival order"
    );

    // An invisible row must not count towards `more`.
    let room = Room::fresh("ghost");
    let m1 = room.msg(1, "alice", "only one");
    room.apply(store, &[m1.clone(), room.edit(6, 5, "bob", "ghost edit"), room.react(7, 5, "bob", "x", false)]).await;
    let page = room.page(store, None, None, 1).await;
    assert_eq!(page.messages, vec![created(&m1)]);
    assert!(!page.more, "the edit-only row at seq 5 is not a message");
    let page = room.page(store, None, Some(1), 1).await;
    assert!(page.messages.is_empty() && !page.more, "{page:?}");
    let page = room.page(store, Some(7), Some(0), 1).await;
    assert_eq!(seqs(&page), vec![1]);
    assert!(!page.more);
}

/// A message is pinned when the last pin event for it pins it: pin, unpin, pin again, a pin that arrives before its
/// message, in any order and any number of times. A deleted message is not pinned, whatever its pins say.
pub async fn pin_unpin_delete<S: HistoryStore>(store: &S) {
    let room = Room::fresh("pins");
    let m1 = room.msg(1, "alice", "pin me");
    let m2 = room.msg(2, "bob", "pin me, then unpin me");
    let m3 = room.msg(3, "carol", "pin me, then delete me");
    let m4 = room.msg(4, "dave", "unpin me, then pin me");
    let events = vec![
        m1.clone(),
        m2.clone(),
        m3.clone(),
        m4.clone(),
        room.pin(5, 1, "alice", true),
        room.pin(6, 2, "alice", true),
        room.pin(7, 2, "alice", false),
        room.pin(8, 3, "alice", true),
        room.delete(9, 3, "carol"),
        room.pin(10, 4, "alice", false),
        room.pin(11, 4, "alice", true),
        room.pin(12, 1, "alice", true),
    ];
    let mut e1 = created(&m1);
    e1.pinned = true;
    let e2 = created(&m2);
    let mut e3 = created(&m3);
    e3.body = None;
    e3.deleted = true;
    let mut e4 = created(&m4);
    e4.pinned = true;
    let want = vec![e1, e2, e3, e4];

    // The live path: one event per batch, in seq order; checked after each step that changes a pin.
    room.apply(store, &events[..5]).await;
    assert!(room.latest(store).await.messages[0].pinned, "pinned");
    room.apply(store, &events[5..6]).await;
    assert!(room.latest(store).await.messages[1].pinned, "pinned before the unpin");
    for event in &events[6..] {
        room.apply(store, std::slice::from_ref(event)).await;
    }
    assert_eq!(room.latest(store).await.messages, want, "pin, unpin, pin then delete folded in");
    assert_eq!(room.last_seq(store).await, 12);

    // The same events in reverse order, twice, in another room: the same history.
    let replayed = Room::fresh("pins-replayed");
    let moved: Vec<RoomEvent> = events
        .iter()
        .map(|event| RoomEvent { tenant: replayed.tenant.clone(), room: replayed.room.clone(), ..event.clone() })
        .collect();
    let reversed: Vec<RoomEvent> = moved.iter().rev().cloned().collect();
    replayed.apply(store, &reversed[..6]).await;
    assert!(replayed.latest(store).await.messages.is_empty(), "pins alone are not messages");
    replayed.apply(store, &reversed).await;
    replayed.apply(store, &moved).await;
    let got = replayed.latest(store).await.messages;
    let pinned: Vec<(u64, bool, bool)> = got.iter().map(|m| (m.seq, m.pinned, m.deleted)).collect();
    assert_eq!(pinned, vec![(1, true, false), (2, false, false), (3, false, true), (4, true, false)]);
}

/// A thread is the messages that reply to one message: paged like history over the replies' seqs (also across
/// buckets, and with replies stored before their parent), with deletes and reactions folded in; every message
/// carries how many replies it has, counted once however often a reply is applied.
pub async fn threads<S: HistoryStore>(store: &S) {
    let room = Room::fresh("threads");
    let reply = |seq: u64, parent: u64| room.msg_full(seq, "bob", &format!("re {parent}: {seq}"), None, Some(parent));
    let mut events = vec![room.msg(1, "alice", "parent"), room.msg(2, "alice", "another parent")];
    events.extend((3..=9).map(|seq| reply(seq, 1)));
    events.push(reply(10, 2));
    // Far in the room's life, in another bucket: replies to 1 and a parent of its own.
    events.push(reply(1_500, 1));
    events.push(room.msg(1_501, "carol", "late parent"));
    events.push(reply(1_502, 1_501));
    events.push(room.delete(1_503, 4, "bob"));
    events.push(room.react(1_504, 5, "alice", "👍", false));
    // Out of order and twice: replies first, then everything again.
    let replies: Vec<RoomEvent> =
        events.iter().filter(|e| matches!(e.body, EventBody::Msg { reply_to: Some(_), .. })).cloned().collect();
    room.apply(store, &replies).await;
    room.apply(store, &events).await;
    room.apply(store, &replies).await;

    let thread = |before: Option<u64>, after: Option<u64>, limit: u32| {
        let query = room.query(before, after, limit);
        async move {
            match store.thread(&query, 1).await {
                Ok(page) => page,
                Err(e) => panic!("thread {before:?} {after:?} {limit}: {e}"),
            }
        }
    };
    let seqs = |page: &HistoryPage| page.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    let latest = thread(None, None, 100).await;
    assert_eq!(seqs(&latest), vec![3, 4, 5, 6, 7, 8, 9, 1_500], "every reply to 1, ascending");
    assert!(!latest.more);
    assert!(latest.messages.iter().all(|m| m.reply_to == Some(1)));
    let deleted = &latest.messages[1];
    assert!(deleted.deleted && deleted.body.is_none(), "a deleted reply stays in its thread as deleted: {deleted:?}");
    assert_eq!(latest.messages[2].reactions.get("👍").map(Vec::len), Some(1), "reactions folded in");
    let last_two = thread(None, None, 2).await;
    assert_eq!((seqs(&last_two), last_two.more), (vec![9, 1_500], true), "the latest page first");
    let older = thread(Some(9), None, 3).await;
    assert_eq!((seqs(&older), older.more), (vec![6, 7, 8], true));
    let after = thread(None, Some(8), 5).await;
    assert_eq!((seqs(&after), after.more), (vec![9, 1_500], false));
    let between = thread(Some(1_500), Some(3), 10).await;
    assert_eq!((seqs(&between), between.more), (vec![4, 5, 6, 7, 8, 9], false));

    // Reply counts on the parents, in history and in threads.
    let counts: Vec<(u64, u64)> = room
        .page(store, None, None, 100)
        .await
        .messages
        .iter()
        .map(|m| (m.seq, m.reply_count))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(counts, vec![(1, 8), (2, 1), (1_501, 1)], "each reply counted once");
    let other = store.thread(&room.query(None, None, 10), 1_501).await.expect("thread of 1501");
    assert_eq!(seqs(&other), vec![1_502]);
    assert!(store.thread(&room.query(None, None, 10), 3).await.expect("no replies").messages.is_empty());
    assert!(store.thread(&room.query(None, None, 10), 999_999).await.expect("no parent").messages.is_empty());
    let foreign = Room::fresh("threads");
    assert!(store.thread(&foreign.query(None, None, 10), 1).await.expect("another tenant").messages.is_empty());
    assert!(matches!(store.thread(&room.query(None, None, 0), 1).await, Err(StoreError::InvalidQuery(_))));
}

/// A `room_deleted` erases every message, reaction and reply before it, across buckets; an earlier event that
/// arrives after it stays gone; the room's later messages (a room created again under the name) are kept, and its
/// head goes on.
pub async fn a_deleted_room_keeps_nothing_from_before<S: HistoryStore>(store: &S) {
    let room = Room::fresh("deleted");
    let neighbour = Room::new(&room.tenant, "neighbour");
    let mut before = vec![room.msg(1, "alice", "first"), room.msg(2, "bob", "second")];
    before.push(room.react(3, 1, "bob", "👍", false));
    before.push(room.msg_full(4, "bob", "a reply", None, Some(1)));
    before.push(room.msg(1_200, "alice", "in another bucket"));
    let late = room.msg(1_201, "alice", "arrives after the deletion");
    room.apply(store, &before).await;
    neighbour.apply(store, &[neighbour.msg(1, "alice", "next door")]).await;
    let deleted = room.event(1_202, EventBody::RoomDeleted {});
    room.apply(store, std::slice::from_ref(&deleted)).await;
    room.apply(store, &[late]).await;
    room.apply(store, &before).await;
    let page = room.page(store, None, None, 100).await;
    assert!(page.messages.is_empty() && !page.more, "nothing before the deletion: {page:?}");
    let thread = store.thread(&room.query(None, None, 10), 1).await.expect("thread");
    assert!(thread.messages.is_empty(), "no reply either: {thread:?}");
    assert_eq!(store.head(&room.tenant, &room.room).await.expect("head").last_seq, 1_202, "the head stays");

    room.apply(store, &[room.msg(1_203, "carol", "a new room"), room.react(1_204, 1_203, "alice", "🎉", false)]).await;
    room.apply(store, &[deleted]).await;
    let page = room.page(store, None, None, 100).await;
    assert_eq!(seqs(&page), vec![1_203], "the room's later life is kept, also when the deletion comes again");
    assert_eq!(page.messages[0].reactions.get("🎉").map(Vec::len), Some(1));
    let next_door = neighbour.page(store, None, None, 10).await;
    assert_eq!(seqs(&next_door), vec![1], "another room is untouched");

    // Deleted again; a room created once that deletion left the events stream starts at seq 1 again, later in
    // time: kept.
    room.apply(store, &[room.event(1_205, EventBody::RoomDeleted {})]).await;
    assert!(room.page(store, None, None, 100).await.messages.is_empty());
    let reborn = RoomEvent { ts_us: ts_us_of(5_000), ..room.msg(1, "dave", "from the start again") };
    room.apply(store, &[reborn]).await;
    let page = room.page(store, None, None, 100).await;
    assert_eq!(seqs(&page), vec![1], "{page:?}");
    let head = store.head(&room.tenant, &room.room).await.expect("head");
    assert_eq!((head.last_seq, head.last_ts_us), (1, ts_us_of(5_000)), "the head is the latest event by time");
}

/// A `user_erased` makes every earlier message of the user in its room a tombstone with no author, body, attrs or
/// edit, and removes their reactions there; a message or reaction of theirs from before it that arrives after it
/// is stored erased, or not at all; the user's authorship lists their rooms and messages before, and nothing of the
/// erased room after. Their messages elsewhere and other users' are untouched.
pub async fn an_erased_user_leaves_tombstones<S: HistoryStore>(store: &S) {
    let room = Room::fresh("erasing");
    let elsewhere = Room::new(&room.tenant, "elsewhere");
    let (tenant, zed) = (room.tenant.clone(), user("zed"));
    let with_attrs = room.msg_full(1, "zed", "mine", Some(serde_json::json!({"k": "v"})), None);
    let events = vec![
        with_attrs,
        room.msg_full(2, "bob", "an answer", None, Some(1)),
        room.react(3, 2, "zed", "👍", false),
        room.react(4, 1, "bob", "👀", false),
        room.edit(5, 1, "zed", "mine, edited"),
        room.msg(1_200, "zed", "in another bucket"),
    ];
    // Arrives only after the erasure, like a redelivery of a batch written alongside it.
    let late = [
        room.msg(1_201, "zed", "late"),
        room.react(1_202, 2, "zed", "🎉", false),
        room.edit(1_203, 1_201, "zed", "a late edit of a late message"),
    ];
    room.apply(store, &events).await;
    elsewhere.apply(store, &[elsewhere.msg(1, "zed", "kept elsewhere")]).await;

    let (rooms, next) = store.authored_rooms(&tenant, &zed, None, 10).await.expect("rooms");
    assert_eq!((rooms, next), (vec![elsewhere.room.clone(), room.room.clone()], None));
    let (first, next) = store.authored_rooms(&tenant, &zed, None, 1).await.expect("a page of one room");
    assert_eq!(first, vec![elsewhere.room.clone()]);
    let (second, _) = store.authored_rooms(&tenant, &zed, next.as_ref(), 1).await.expect("the next room");
    assert_eq!(second, vec![room.room.clone()]);
    let mut exported = Vec::new();
    let mut after: Option<(RoomId, u64)> = None;
    for _ in 0..20 {
        let page = store
            .authored_messages(&tenant, &zed, after.as_ref().map(|(r, s)| (r, *s)), 2)
            .await
            .expect("authored messages");
        exported.extend(page.messages.into_iter().map(|(r, m)| (r.to_string(), m.body.unwrap_or_default())));
        after = page.next;
        if after.is_none() {
            break;
        }
    }
    let in_room = |body: &str| (room.room.to_string(), body.to_owned());
    let mut expected = vec![
        ("elsewhere".to_owned(), "kept elsewhere".to_owned()),
        in_room("mine, edited"),
        in_room("in another bucket"),
    ];
    expected.sort();
    exported.sort();
    assert_eq!(exported, expected, "the user's messages as they read now, without their reactions");

    room.apply(store, &[room.event(1_300, EventBody::UserErased { user: zed.clone() })]).await;
    room.apply(store, &late).await;
    room.apply(store, &events).await;
    let page = room.page(store, None, None, 100).await;
    assert_eq!(seqs(&page), vec![1, 2, 1_200, 1_201]);
    for message in page.messages.iter().filter(|m| m.seq != 2) {
        assert_eq!(
            (&message.from, &message.body, &message.attrs, message.edited_ts, message.deleted),
            (&None, &None, &None, None, true),
            "a tombstone keeps nothing of the erased user: {message:?}"
        );
    }
    assert_eq!(page.messages[0].reactions, reactions(&[("👀", &["bob"])]), "another user's reaction stays");
    assert_eq!(page.messages[0].reply_count, 1);
    let answer = &page.messages[1];
    assert_eq!((answer.from.as_ref(), answer.body.as_deref()), (Some(&user("bob")), Some("an answer")));
    assert!(answer.reactions.is_empty(), "the erased user's reactions are gone: {answer:?}");
    assert_eq!(seqs(&store.thread(&room.query(None, None, 10), 1).await.expect("thread")), vec![2]);
    let (rooms, _) = store.authored_rooms(&tenant, &zed, None, 10).await.expect("rooms");
    assert_eq!(rooms, vec![elsewhere.room.clone()], "nothing of the erased room is listed");
    let left = store.authored_messages(&tenant, &zed, None, 10).await.expect("authored messages");
    assert_eq!(left.messages.len(), 1, "{left:?}");
    assert_eq!(elsewhere.page(store, None, None, 10).await.messages[0].from, Some(zed.clone()));
    let head = store.head(&room.tenant, &room.room).await.expect("head");
    assert_eq!(head.last_seq, 1_300);

    // A room deleted and created again under its name, its seqs started again: the user's index entries of the old
    // room point at another user's messages now, which neither an export nor an erasure takes for theirs.
    let reborn = Room::new(&room.tenant, "reborn");
    reborn
        .apply(store, &[reborn.msg(1, "zed", "before the deletion"), reborn.event(2, EventBody::RoomDeleted {})])
        .await;
    let later = |event: RoomEvent, seq: u64| RoomEvent { ts_us: ts_us_of(5_000 + seq), ..event };
    reborn.apply(store, &[later(reborn.msg(1, "bob", "bob's, in the new room"), 1)]).await;
    let exported = store.authored_messages(&tenant, &zed, None, 10).await.expect("authored messages");
    assert!(exported.messages.iter().all(|(r, _)| r != &reborn.room), "{exported:?}");
    reborn.apply(store, &[later(reborn.event(2, EventBody::UserErased { user: zed.clone() }), 2)]).await;
    let page = reborn.page(store, None, None, 10).await;
    assert_eq!(page.messages[0].body.as_deref(), Some("bob's, in the new room"), "{page:?}");
    // A message of the same id after the erasure (a new user of that id) is no late write of the erased user's.
    let anew = later(reborn.msg(3, "zed", "zed again, as a new user, after the erasure"), 3);
    reborn.apply(store, &[anew]).await;
    let page = reborn.page(store, None, None, 10).await;
    assert_eq!(
        page.messages.last().and_then(|m| m.body.as_deref()),
        Some("zed again, as a new user, after the erasure")
    );
}

/// Messages past their `expires_ms` are never read (one already past it when it arrives is not even written), with
/// their reactions and thread entries; messages without one stay; the head is not moved back.
pub async fn expired_messages_are_never_read<S: HistoryStore>(store: &S) {
    let room = Room::fresh("expiring");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    let expiring = |event: RoomEvent, at: u64| RoomEvent { expires_ms: Some(at), ..event };
    let soon = now + 1_500;
    room.apply(
        store,
        &[
            expiring(room.msg(1, "alice", "gone already"), now - 1),
            expiring(room.msg(2, "alice", "going soon"), soon),
            expiring(room.msg_full(3, "bob", "a reply", None, Some(2)), soon),
            room.msg(4, "alice", "for good"),
            expiring(room.react(5, 2, "bob", "👍", false), soon),
            room.msg(6, "alice", "also for good"),
            // Changes to a message live as long as the message, whatever their own expiry (a retention set later).
            expiring(room.delete(7, 4, "alice"), now - 1),
            expiring(room.edit(8, 6, "alice", "edited under a retention"), soon),
        ],
    )
    .await;
    let page = room.page(store, None, None, 100).await;
    assert_eq!(seqs(&page), vec![2, 3, 4, 6], "{page:?}");
    assert_eq!((page.messages[0].reply_count, page.messages[0].reactions.len()), (1, 1));
    tokio::time::sleep(std::time::Duration::from_millis(2_600)).await;
    store.sweep().await.expect("sweep");
    let page = room.page(store, None, None, 100).await;
    assert_eq!(seqs(&page), vec![4, 6], "only the messages without an expiry are left: {page:?}");
    assert!(page.messages[0].deleted, "a deletion whose own expiry had passed still applies: {page:?}");
    assert_eq!(page.messages[1].body.as_deref(), Some("edited under a retention"), "the edit lives with its message");
    let thread = store.thread(&room.query(None, None, 10), 2).await.expect("thread");
    assert!(thread.messages.is_empty(), "{thread:?}");
    assert_eq!(store.head(&room.tenant, &room.room).await.expect("head").last_seq, 8);
}

/// A message with more replies than `MAX_REPLY_COUNT` shows that many, while its thread pages them all.
pub async fn reply_counts_stop_at_their_bound<S: HistoryStore>(store: &S) {
    let room = Room::fresh("hot-thread");
    let bound = switchyard_protocol::limits::MAX_REPLY_COUNT;
    let mut events = vec![room.msg(1, "alice", "a hot topic")];
    events.extend((2..=bound + 2).map(|seq| room.msg_full(seq, "bob", "me too", None, Some(1))));
    room.apply(store, &events).await;
    let parent = room.page(store, None, Some(0), 1).await;
    assert_eq!(parent.messages[0].reply_count, bound, "{} replies show as {bound}", bound + 1);
    let last = store.thread(&room.query(None, None, 1), 1).await.expect("the thread's last page");
    assert_eq!(last.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [bound + 2]);
    assert!(last.more);
}

/// An event with a number beyond a signed 64-bit integer is `Rejected` (the same on every attempt), and the batch
/// holding it writes nothing, so the caller can isolate it; the same events without it apply normally.
pub async fn rejects_out_of_range_values<S: HistoryStore>(store: &S) {
    let room = Room::fresh("poison");
    let good = room.msg(1, "alice", "fine");
    let huge_target = room.edit(2, u64::MAX, "alice", "nowhere");
    let mut huge_seq = room.joined(3, "bob");
    huge_seq.seq = i64::MAX as u64 + 1;
    let mut huge_reply = room.msg_full(4, "bob", "reply", None, Some(u64::MAX));
    huge_reply.ts_us = ts_us_of(4);
    let mut huge_ts = room.msg(5, "bob", "late");
    huge_ts.ts_us = u64::MAX;
    for poison in [huge_target, huge_seq, huge_reply, huge_ts] {
        for attempt in 0..2 {
            match store.apply(&[good.clone(), poison.clone()]).await {
                Err(StoreError::Rejected(_)) => {}
                other => panic!("attempt {attempt}: {poison:?} must be rejected, got {other:?}"),
            }
        }
    }
    assert_eq!(room.last_seq(store).await, 0, "a rejected batch writes nothing");
    room.apply(store, std::slice::from_ref(&good)).await;
    assert_eq!(room.latest(store).await.messages, vec![created(&good)]);
}

/// A fixed, busy room: messages, edits, deletes, reactions, joins and lefts, with targets among earlier messages.
fn busy_room_events(room: &Room, count: u64) -> Vec<RoomEvent> {
    let users = ["alice", "bob", "carol", "dave"];
    let emojis = ["👍", "🎉", "x"];
    let mut gen = Rng::seeded(0x5eed_cafe_f00d);
    let mut msgs: Vec<u64> = Vec::new();
    let mut events = Vec::new();
    for seq in 1..=count {
        let who = users[gen.below(users.len() as u64) as usize];
        let roll = gen.below(100);
        let target = (!msgs.is_empty()).then(|| msgs[gen.below(msgs.len() as u64) as usize]);
        let ev = match (roll, target) {
            (0..=39, _) | (_, None) => {
                msgs.push(seq);
                let attrs = (roll < 14).then(|| json!({"i": seq}));
                let reply = (20..30).contains(&roll).then_some(target).flatten();
                room.msg_full(seq, who, &format!("busy {seq}"), attrs, reply)
            }
            (40..=54, Some(t)) => room.edit(seq, t, who, &format!("edit {seq} of {t}")),
            (55..=59, Some(t)) => room.delete(seq, t, who),
            (60..=89, Some(t)) => {
                let emoji = emojis[gen.below(emojis.len() as u64) as usize];
                room.react(seq, t, who, emoji, roll >= 78)
            }
            (90..=94, _) => room.joined(seq, who),
            (_, _) => room.left(seq, who, None),
        };
        events.push(ev);
    }
    events
}

/// The same room re-targeted to another tenant: same events, seqs, timestamps and ids.
fn retarget(events: &[RoomEvent], to: &Room) -> Vec<RoomEvent> {
    events.iter().map(|e| RoomEvent { tenant: to.tenant.clone(), room: to.room.clone(), ..e.clone() }).collect()
}

async fn all_pages_forward<S: HistoryStore>(room: &Room, store: &S, limit: u32) -> Vec<Message> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = room.page(store, None, Some(after), limit).await;
        if let Some(last) = page.messages.last() {
            after = last.seq;
        }
        out.extend(page.messages);
        if !page.more {
            return out;
        }
    }
}

/// Applying a room's events in order, re-applying them, or applying them shuffled, duplicated and in odd batches
/// all yield identical history and last seq.
pub async fn idempotent_out_of_order<S: HistoryStore>(store: &S) {
    let in_order = Room::fresh("busy");
    let events = busy_room_events(&in_order, 160);
    for chunk in events.chunks(10) {
        in_order.apply(store, chunk).await;
    }
    let reference = all_pages_forward(&in_order, store, 100).await;
    let reference_latest = in_order.latest(store).await;
    assert!(
        reference.iter().any(|m| m.edited_ts.is_some())
            && reference.iter().any(|m| m.deleted)
            && reference.iter().any(|m| !m.reactions.is_empty()),
        "conformance bug: the busy room should exercise edits, deletes and reactions"
    );
    assert_eq!(in_order.last_seq(store).await, 160);

    // The whole stream again, in one batch: nothing changes.
    in_order.apply(store, &events).await;
    assert_eq!(all_pages_forward(&in_order, store, 100).await, reference, "re-apply changed history");
    assert_eq!(in_order.latest(store).await, reference_latest);

    // The same events shuffled, each delivered one to three times, in batches of random sizes.
    let mut rng = Rng::random();
    let seed = rng.state;
    let shuffled = Room::fresh("busy");
    let mut deliveries: Vec<RoomEvent> = Vec::new();
    for ev in retarget(&events, &shuffled) {
        for _ in 0..=rng.below(3) {
            deliveries.push(ev.clone());
        }
    }
    rng.shuffle(&mut deliveries);
    let mut rest = deliveries.as_slice();
    while !rest.is_empty() {
        let n = (1 + rng.below(40) as usize).min(rest.len());
        shuffled.apply(store, &rest[..n]).await;
        rest = &rest[n..];
    }
    assert_eq!(
        all_pages_forward(&shuffled, store, 100).await,
        reference,
        "shuffled, duplicated apply differs from in-order apply (shuffle seed {seed:#x})"
    );
    assert_eq!(shuffled.latest(store).await, reference_latest, "shuffle seed {seed:#x}");
    assert_eq!(shuffled.last_seq(store).await, 160, "shuffle seed {seed:#x}");
    // Small pages walk the same sequence.
    assert_eq!(all_pages_forward(&shuffled, store, 7).await, reference, "paging by 7 (shuffle seed {seed:#x})");
}

/// The same room name in two tenants holds two separate histories, reactions and last seqs.
pub async fn tenant_isolation<S: HistoryStore>(store: &S) {
    let a = Room::fresh("general");
    let b = Room::fresh("general");
    assert_ne!(a.tenant, b.tenant);
    let a_events =
        [a.msg(1, "alice", "tenant a one"), a.msg(2, "alice", "tenant a two"), a.msg(3, "alice", "tenant a three")];
    let b_events = [
        b.msg(1, "mallory", "tenant b one"),
        b.react(2, 1, "mallory", "😈", false),
        b.edit(3, 2, "mallory", "edit aimed at a's seq 2"),
        b.delete(4, 3, "mallory"),
        b.joined(5, "mallory"),
    ];
    // Both tenants in one batch: a batch may mix tenants.
    let mixed: Vec<RoomEvent> = a_events.iter().chain(b_events.iter()).cloned().collect();
    a.apply(store, &mixed).await;

    let page = a.latest(store).await;
    assert_eq!(page.messages, a_events.iter().map(created).collect::<Vec<_>>(), "tenant a");
    let page = b.latest(store).await;
    let mut b1 = created(&b_events[0]);
    b1.reactions = reactions(&[("😈", &["mallory"])]);
    assert_eq!(page.messages, vec![b1], "tenant b");
    assert_eq!(a.last_seq(store).await, 3);
    assert_eq!(b.last_seq(store).await, 5);

    let other = Room::fresh("general");
    assert!(other.latest(store).await.messages.is_empty());
    assert_eq!(other.last_seq(store).await, 0);
}

/// Rooms of one tenant are separate, including rooms whose names are prefixes of each other and dm rooms.
pub async fn room_isolation<S: HistoryStore>(store: &S) {
    let tenant = ProjectId::generate();
    let names = ["a", "ab", "a-b", "a_", "dm:alice:bob", "dm:alice:bobby"];
    let rooms: Vec<Room> = names.iter().map(|n| Room::new(&tenant, n)).collect();
    let mut batch = Vec::new();
    let mut expected = Vec::new();
    for (i, room) in rooms.iter().enumerate() {
        let count = i as u64 + 1;
        let mut msgs = Vec::new();
        for seq in 1..=count {
            let ev = room.msg(seq, "alice", &format!("{} #{seq}", room.room));
            msgs.push(created(&ev));
            batch.push(ev);
        }
        // A reaction on seq 1 of each room, by a user named after the room index.
        let reactor = format!("u{i}");
        batch.push(room.react(count + 1, 1, &reactor, "👍", false));
        msgs[0].reactions = reactions(&[("👍", &[reactor.as_str()])]);
        expected.push((count + 1, msgs));
    }
    rooms[0].apply(store, &batch).await;
    for (room, (last, msgs)) in rooms.iter().zip(expected) {
        let page = room.latest(store).await;
        assert_eq!(page.messages, msgs, "room {}", room.room);
        assert!(!page.more, "room {}", room.room);
        assert_eq!(room.last_seq(store).await, last, "room {}", room.room);
    }
}

/// Thousands of seqs in one room, spread over several storage buckets (with an empty stretch and a wholly empty
/// bucket): every page, by before, after, both or neither, matches the reference exactly, `more` included.
pub async fn paging_across_buckets<S: HistoryStore>(store: &S) {
    const TOTAL: u64 = 3_200;
    let room = Room::fresh("big");
    let mut events = Vec::with_capacity(TOTAL as usize);
    let mut all = Vec::new();
    for seq in 1..=TOTAL {
        let membership_only = (1_200..=1_899).contains(&seq) || (2_000..=2_999).contains(&seq);
        let ev = match seq % 10 {
            _ if membership_only && seq % 2 == 0 => room.joined(seq, "j"),
            _ if membership_only => room.left(seq, "j", None),
            3 => room.joined(seq, "j"),
            7 => room.left(seq, "j", None),
            _ => {
                let ev = room.msg(seq, "pager", &format!("page body {seq}"));
                all.push(created(&ev));
                ev
            }
        };
        events.push(ev);
    }
    for chunk in events.chunks(250) {
        room.apply(store, chunk).await;
    }
    assert_eq!(room.last_seq(store).await, TOTAL);

    let check = |before: Option<u64>, after: Option<u64>, limit: u32, got: &HistoryPage| {
        let want = reference_page(&all, before, after, limit);
        assert_eq!(seqs(got), seqs(&want), "seqs for before={before:?} after={after:?} limit={limit}");
        assert_eq!(got.more, want.more, "more for before={before:?} after={after:?} limit={limit}");
        assert_eq!(got, &want, "page for before={before:?} after={after:?} limit={limit}");
    };

    // Latest pages.
    for limit in [1, 50, 100] {
        let got = room.page(store, None, None, limit).await;
        check(None, None, limit, &got);
    }

    // Walk backwards from the end to the start.
    let mut walked = Vec::new();
    let mut before = None;
    loop {
        let got = room.page(store, before, None, 100).await;
        check(before, None, 100, &got);
        let first = got.messages.first().map(|m| m.seq);
        walked.splice(0..0, got.messages.iter().cloned());
        if !got.more {
            break;
        }
        before = first;
    }
    assert_eq!(walked, all, "backward walk covers every message once");

    // Walk forwards from the start, with a page size that does not divide the bucket size.
    let mut walked = Vec::new();
    let mut after = 0;
    loop {
        let got = room.page(store, None, Some(after), 97).await;
        check(None, Some(after), 97, &got);
        if let Some(last) = got.messages.last() {
            after = last.seq;
        }
        walked.extend(got.messages.iter().cloned());
        if !got.more {
            break;
        }
    }
    assert_eq!(walked, all, "forward walk covers every message once");

    // Both bounds, forwards through the empty bucket.
    let mut after = 900;
    loop {
        let got = room.page(store, Some(3_100), Some(after), 100).await;
        check(Some(3_100), Some(after), 100, &got);
        match got.messages.last() {
            Some(last) if got.more => after = last.seq,
            _ => break,
        }
    }

    // Pages that exactly fill, or miss by one, at the edges and next to the empty stretches.
    let n = all.len();
    let seq_at = |i: usize| all[i].seq;
    let mut cases: Vec<(Option<u64>, Option<u64>, u32)> = vec![
        (Some(seq_at(100)), None, 100),
        (Some(seq_at(101)), None, 100),
        (Some(seq_at(99)), None, 100),
        (None, Some(seq_at(n - 101)), 100),
        (None, Some(seq_at(n - 102)), 100),
        (None, Some(seq_at(n - 100)), 100),
        (Some(1_000), Some(998), 5),
        (Some(1_001), Some(999), 1),
        (Some(2_001), Some(1_998), 3),
        (Some(3_000), None, 100),
        (Some(3_001), None, 1),
        (Some(3_003), None, 2),
        (None, Some(1_199), 3),
        (None, Some(1_999), 1),
        (None, Some(2_999), 1),
        (None, Some(TOTAL), 10),
        (Some(TOTAL + 1), None, 100),
        (Some(1), None, 10),
    ];
    // A both-bounded page ending exactly at the last message before the empty bucket.
    let before_gap: Vec<&Message> = all.iter().filter(|m| m.seq < 3_000).collect();
    let k = before_gap.len();
    cases.push((Some(3_150), Some(before_gap[k - 10].seq - 1), 10));
    cases.push((Some(3_150), Some(before_gap[k - 10].seq - 1), 9));
    // A before-only page starting exactly at the first message after the empty bucket.
    let after_gap: Vec<&Message> = all.iter().filter(|m| m.seq >= 3_000).collect();
    cases.push((Some(after_gap[4].seq + 1), None, 5));
    cases.push((Some(after_gap[4].seq + 1), None, 6));

    let mut rng = Rng::random();
    let seed = rng.state;
    for _ in 0..40 {
        let a = rng.below(TOTAL + 2);
        let b = rng.below(TOTAL + 2);
        let limit = 1 + rng.below(100) as u32;
        let case = match rng.below(4) {
            0 => (None, None, limit),
            1 => (Some(a), None, limit),
            2 => (None, Some(a), limit),
            _ => (Some(a.max(b)), Some(a.min(b)), limit),
        };
        cases.push(case);
    }
    for (before, after, limit) in cases {
        let got = room.page(store, before, after, limit).await;
        let want = reference_page(&all, before, after, limit);
        assert_eq!(got, want, "before={before:?} after={after:?} limit={limit} (random seed {seed:#x})");
    }
}

/// Two messages five billion seqs apart (millions of storage buckets between them), with joins, leaves, an edit
/// and reactions around them and in the stretch between: every kind of page (after, before, both, neither) returns
/// the right messages and `more`, without walking the empty stretch.
pub async fn messages_far_apart<S: HistoryStore>(store: &S) {
    const FAR: u64 = 5_000_000_000;
    let room = Room::fresh("sparse");
    let first = room.msg(1, "alice", "first");
    let far = room.msg(FAR, "bob", "far away");
    let mut near = vec![first.clone()];
    for seq in 2..=300 {
        near.push(match seq % 3 {
            0 => room.joined(seq, "j"),
            1 => room.left(seq, "j", None),
            _ => room.react(seq, 1, &format!("r{}", seq % 7), "👍", seq % 5 == 0),
        });
    }
    let between = [
        room.joined(1_234_567, "k"),
        room.edit(2_500_000_000, 1, "alice", "first, edited"),
        room.react(4_999_999_999, 1, "zoe", "🎉", false),
    ];
    // The reaction on the far message arrives before the message itself.
    let around_far =
        [room.react(FAR + 2, FAR, "carol", "❤", false), room.left(FAR + 1, "k", None), room.joined(FAR - 1, "k")];

    room.apply(store, &around_far).await;
    room.apply(store, &between).await;
    room.apply(store, &near).await;
    room.apply(store, std::slice::from_ref(&far)).await;
    assert_eq!(room.head(store).await, RoomHead { last_seq: FAR + 2, last_ts_us: ts_us_of(FAR + 2) });

    let mut want_first = created(&first);
    want_first.body = Some("first, edited".into());
    want_first.edited_ts = Some(ts_us_of(2_500_000_000) / 1000);
    // Reactions at seqs 2..=300 with seq % 3 == 2, by r(seq % 7), removed when seq % 5 == 0; the latest per user wins.
    let mut latest: BTreeMap<String, bool> = BTreeMap::new();
    for seq in (2..=300).filter(|s| s % 3 == 2) {
        latest.insert(format!("r{}", seq % 7), seq % 5 == 0);
    }
    let thumbs: Vec<&str> = latest.iter().filter(|(_, removed)| !**removed).map(|(u, _)| u.as_str()).collect();
    want_first.reactions = reactions(&[("👍", &thumbs), ("🎉", &["zoe"])]);
    let mut want_far = created(&far);
    want_far.reactions = reactions(&[("❤", &["carol"])]);
    let all = vec![want_first, want_far];

    let cases: [(Option<u64>, Option<u64>, u32); 20] = [
        (None, None, 1),
        (None, None, 2),
        (None, None, 100),
        (Some(FAR), None, 1),
        (Some(FAR + 1), None, 1),
        (Some(FAR + 1), None, 2),
        (Some(FAR + 3), None, 100),
        (Some(2), None, 1),
        (None, Some(0), 1),
        (None, Some(0), 2),
        (None, Some(1), 1),
        (None, Some(1), 100),
        (None, Some(FAR), 5),
        (None, Some(FAR - 1), 1),
        (Some(FAR + 1), Some(0), 1),
        (Some(FAR + 1), Some(0), 2),
        (Some(FAR + 1), Some(1), 1),
        (Some(FAR), Some(1), 10),
        (Some(FAR), Some(0), 10),
        (Some(u64::MAX), Some(0), 1),
    ];
    for (before, after, limit) in cases {
        let got = room.page(store, before, after, limit).await;
        let want = reference_page(&all, before, after, limit);
        assert_eq!(got, want, "far apart: before={before:?} after={after:?} limit={limit}");
    }
}
