//! Presence for the users of one shard: which users have sessions on which gateways,
//! online/offline events on the first open and the last close anywhere in the fleet, and `last_seen`.
//!
//! Gateways report changes (a user's first session opened or last one closed on that gateway) and send periodic
//! snapshots; a gateway that stops sending them is presumed dead and its users' sessions expire. Each user's
//! announced state is kept in a presence record, so a new owner rebuilding the table from snapshots announces only
//! real changes. This module does not track sessions themselves; gateways do.

use crate::context::RouterContext;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_protocol::internal::{LiveMessage, PresenceRecord, PresenceSnapshot, INTERNAL_VERSION};
use switchyard_protocol::{codec, subjects, ProjectId, UserId};
use switchyard_service::nats::latest_value;

/// How long a gateway's report of a user lasts without a refresh: two missed snapshots. With the expiry tick and
/// the offline grace, a dead gateway's users go offline within 15 s.
pub(crate) const PRESENCE_EXPIRY: Duration = Duration::from_secs(10);
/// How long a user with no session left stays online before going offline: absorbs reconnects, and reports from
/// two gateways that cross each other.
const OFFLINE_GRACE: Duration = Duration::from_millis(1500);

/// One user's presence.
#[derive(Default)]
struct UserPresence {
    /// Gateways with at least one session of the user, and when each last said so.
    gateways: HashMap<String, Instant>,
    /// When the last gateway went away; the user goes offline once the grace has passed.
    leaving_since: Option<Instant>,
}

/// The presence table of one shard.
pub(crate) struct PresenceTable {
    ctx: Arc<RouterContext>,
    users: HashMap<(ProjectId, UserId), UserPresence>,
}

fn now_ms() -> u64 {
    crate::room::now_us() / 1000
}

impl PresenceTable {
    pub fn new(ctx: Arc<RouterContext>) -> Self {
        PresenceTable { ctx, users: HashMap::new() }
    }

    /// A gateway's sessions of a user opened or closed.
    pub async fn sessions_changed(&mut self, tenant: ProjectId, user: UserId, gateway: String, online: bool) {
        let key = (tenant, user);
        if online {
            self.seen_on(key, gateway).await;
        } else {
            self.gone_from(&key, &gateway).await;
        }
    }

    /// Forget the user (erased): out of the table, and its presence record purged from the bucket, so neither
    /// `online` nor `last_seen` is answered any more. Watchers of a user still online are told it went offline.
    pub async fn forget(
        &mut self,
        tenant: ProjectId,
        user: UserId,
    ) -> Result<(), async_nats::jetstream::stream::PurgeError> {
        let key = (tenant, user);
        if self.users.remove(&key).is_some() {
            self.announce(&key, false).await;
        }
        let subject = subjects::rooms_bucket_subject(&subjects::presence_key(&key.0, &key.1));
        self.ctx.rooms.stream.purge().filter(subject).await?;
        Ok(())
    }

    /// Whether each of `users` is online now (in the table), without reading anything.
    pub fn online(&self, tenant: &ProjectId, users: Vec<UserId>) -> Vec<(UserId, bool)> {
        users
            .into_iter()
            .map(|user| {
                let key = (tenant.clone(), user);
                let online = self.users.contains_key(&key);
                (key.1, online)
            })
            .collect()
    }

    /// Apply a gateway's snapshot: every listed user is present there; every other user it had is not.
    pub async fn snapshot(&mut self, snapshot: PresenceSnapshot) {
        let listed: std::collections::HashSet<(ProjectId, UserId)> = snapshot.users.into_iter().collect();
        let stale: Vec<(ProjectId, UserId)> = self
            .users
            .iter()
            .filter(|(key, presence)| presence.gateways.contains_key(&snapshot.gateway) && !listed.contains(*key))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            self.gone_from(&key, &snapshot.gateway).await;
        }
        for key in listed {
            self.seen_on(key, snapshot.gateway.clone()).await;
        }
    }

    /// Forget gateways that stopped reporting, and take users whose grace has passed offline.
    pub async fn expire(&mut self) {
        let now = Instant::now();
        let leaving: Vec<(ProjectId, UserId)> = self
            .users
            .iter()
            .filter(|(_, presence)| {
                presence.leaving_since.is_some_and(|since| now.duration_since(since) >= OFFLINE_GRACE)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in leaving {
            self.users.remove(&key);
            let record = PresenceRecord { v: INTERNAL_VERSION, online: false, last_seen: Some(now_ms()) };
            self.store(&key, &record).await;
            self.announce(&key, false).await;
        }
        let expired: Vec<((ProjectId, UserId), String)> = self
            .users
            .iter()
            .flat_map(|(key, presence)| {
                presence
                    .gateways
                    .iter()
                    .filter(|(_, at)| now.duration_since(**at) > PRESENCE_EXPIRY)
                    .map(move |(gateway, _)| (key.clone(), gateway.clone()))
            })
            .collect();
        for (key, gateway) in expired {
            self.gone_from(&key, &gateway).await;
        }
    }

    async fn seen_on(&mut self, key: (ProjectId, UserId), gateway: String) {
        let presence = self.users.entry(key.clone()).or_default();
        // Present in the table means announced online (or leaving, still online until its grace ends).
        let was_online = !presence.gateways.is_empty() || presence.leaving_since.is_some();
        presence.gateways.insert(gateway, Instant::now());
        presence.leaving_since = None;
        if was_online {
            return;
        }
        let mut record = self.record(&key.0, &key.1).await;
        if record.online {
            // Already announced, by this owner or a previous one: a rebuild, not a change.
            return;
        }
        record.online = true;
        self.store(&key, &record).await;
        self.announce(&key, true).await;
    }

    async fn gone_from(&mut self, key: &(ProjectId, UserId), gateway: &str) {
        let Some(presence) = self.users.get_mut(key) else { return };
        if presence.gateways.remove(gateway).is_some() && presence.gateways.is_empty() {
            presence.leaving_since = Some(Instant::now());
        }
    }

    async fn announce(&self, key: &(ProjectId, UserId), online: bool) {
        let message = LiveMessage::Presence { user: key.1.clone(), online, ts: now_ms() };
        if let Ok(payload) = codec::encode(&message) {
            let _ = self.ctx.nats.publish(subjects::presence_events(&key.0, &key.1), payload).await;
        }
    }

    async fn record(&self, tenant: &ProjectId, user: &UserId) -> PresenceRecord {
        match latest_value(&self.ctx.rooms, &subjects::presence_key(tenant, user)).await {
            Ok(Some(bytes)) => codec::decode(&bytes).unwrap_or_default(),
            _ => PresenceRecord::default(),
        }
    }

    async fn store(&self, key: &(ProjectId, UserId), record: &PresenceRecord) {
        let Ok(payload) = codec::encode(record) else { return };
        if let Err(error) = self.ctx.rooms.put(subjects::presence_key(&key.0, &key.1), payload).await {
            tracing::warn!(%error, "cannot store a presence record");
        }
    }
}
