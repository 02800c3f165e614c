//! Versioned broker topology: the exchanges, queues and bindings of `migrations/*.toml`,
//! embedded in the binary, applied in order by `retoucher migrate` ([`migrate`]) and checked
//! by the worker at start ([`verify`]), so a worker never consumes from a half-built topology.
//!
//! The broker itself records which versions are applied, one durable marker exchange per
//! version and per jobs queue (`{queue}.topology.v0001`, …): it needs no other store, shows
//! up in the management UI, and deployments with different queue names on one vhost do not
//! see each other's versions. Markers are written only after every step of their version
//! succeeded, and every step is an idempotent declare, so an interrupted run is simply run
//! again.
//!
//! Rolling upgrades: each migration says whether it is `additive` (it only declares exchanges,
//! queues and bindings that no earlier version declares, so workers built for earlier versions
//! keep working on it). An additive version gets a second marker,
//! `{queue}.topology.v0003.additive`, so a worker that does not know it can still tell, from
//! the broker alone, that it may go on consuming ([`Migrations::verify`]); a version that is not
//! additive makes older workers stop with the version they need.
//!
//! [`Migrations`] is a set of migration files: the binary's own, or for rehearsing an upgrade a
//! folder's (`broker.migrations`). The free functions use the binary's own.

use std::{
    collections::HashSet,
    fmt,
    path::{Path, PathBuf},
};

use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString},
    Channel, Connection, ExchangeKind,
};
use serde::Deserialize;

use super::{is_not_found, short_string, BrokerError};

/// One migration file: a version of the topology.
#[derive(Debug, Clone)]
pub struct Migration {
    pub version: u32,
    /// The file name without `.toml`, `NNNN_what` (`0001_initial`).
    pub name: String,
    pub text: String,
}

/// The migrations built into this binary, in version order, starting at 1 without gaps.
/// A released file is never edited: a change is a new file with the next number.
const EMBEDDED: &[(&str, &str)] = &[
    (
        "0001_initial",
        include_str!("../../migrations/0001_initial.toml"),
    ),
    (
        "0002_retry_delays",
        include_str!("../../migrations/0002_retry_delays.toml"),
    ),
];

/// The placeholder for the jobs queue name in migration files.
const QUEUE_PLACEHOLDER: &str = "{queue}";

/// The longest suffix added to the queue name (`.topology.v0001.additive`); AMQP names stop
/// at 255 bytes.
const LONGEST_SUFFIX: usize = ".topology.v0000.additive".len();

/// A complete set of migrations, versions 1 to N without gaps.
#[derive(Debug, Clone)]
pub struct Migrations {
    list: Vec<Migration>,
    /// Where they come from, for messages: "built-in" or the folder.
    source: String,
}

impl Migrations {
    /// The migrations built into this binary.
    pub fn embedded() -> Migrations {
        Migrations {
            list: EMBEDDED
                .iter()
                .enumerate()
                .map(|(i, (name, text))| Migration {
                    version: i as u32 + 1,
                    name: (*name).to_owned(),
                    text: (*text).to_owned(),
                })
                .collect(),
            source: "built-in".to_owned(),
        }
    }

    /// `broker.migrations`: the built-in set when `dir` is empty, else [`Migrations::from_dir`].
    pub fn configured(dir: &Path) -> Result<Migrations, BrokerError> {
        if dir.as_os_str().is_empty() {
            Ok(Migrations::embedded())
        } else {
            Migrations::from_dir(dir)
        }
    }

    /// The `NNNN_name.toml` files of a folder (other files are ignored), numbered from 1
    /// without gaps, each parsed and checked as `migrate` would.
    pub fn from_dir(dir: &Path) -> Result<Migrations, BrokerError> {
        let invalid = |reason: String| BrokerError::InvalidMigration {
            name: dir.display().to_string(),
            reason,
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| invalid(format!("cannot read the migrations folder: {e}")))?;
        let mut files: Vec<(u32, String, PathBuf)> = Vec::new();
        for entry in entries {
            let path = entry
                .map_err(|e| invalid(format!("cannot read the migrations folder: {e}")))?
                .path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".toml"))
            else {
                continue;
            };
            let Some(version) = name
                .split_once('_')
                .and_then(|(number, _)| (number.len() == 4).then_some(number))
                .and_then(|number| number.parse::<u32>().ok())
            else {
                continue;
            };
            files.push((version, name.to_owned(), path));
        }
        files.sort();
        let mut list = Vec::with_capacity(files.len());
        for (i, (version, name, path)) in files.into_iter().enumerate() {
            if version != i as u32 + 1 {
                return Err(invalid(format!(
                    "{name}: expected version {} (versions start at 1, without gaps or repeats)",
                    i + 1
                )));
            }
            let text = std::fs::read_to_string(&path)
                .map_err(|e| invalid(format!("cannot read {name}: {e}")))?;
            list.push(Migration {
                version,
                name,
                text,
            });
        }
        if list.is_empty() {
            return Err(invalid("no NNNN_name.toml migration in it".to_owned()));
        }
        let migrations = Migrations {
            list,
            source: dir.display().to_string(),
        };
        // Malformed files, and "additive" versions that are not, refused up front.
        migrations.parsed("retoucher.jobs")?;
        Ok(migrations)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Migration> {
        self.list.iter()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The version this set brings the broker to.
    pub fn latest(&self) -> u32 {
        self.list.last().map_or(0, |m| m.version)
    }

    /// Where the set comes from: "built-in" or its folder.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Every migration parsed for `queue`, with `{queue}` substituted, and checked: a version
    /// that says it is additive must not declare again what an earlier version declared
    /// (changing an exchange, queue or binding is what older workers cannot follow).
    fn parsed(&self, queue: &str) -> Result<Vec<Spec>, BrokerError> {
        check_queue_name(queue)?;
        let specs: Vec<Spec> = self
            .list
            .iter()
            .map(|m| Spec::parse(m, queue))
            .collect::<Result<_, _>>()?;
        let mut declared: HashSet<String> = HashSet::new();
        for (migration, spec) in self.list.iter().zip(&specs) {
            let names = spec.declared_names();
            if spec.additive {
                if let Some(again) = names.iter().find(|n| declared.contains(*n)) {
                    return Err(BrokerError::InvalidMigration {
                        name: migration.name.clone(),
                        reason: format!(
                            "it says additive = true but declares {again} again, which an \
                             earlier version declared: a change to what exists is not additive"
                        ),
                    });
                }
            }
            declared.extend(names);
        }
        Ok(specs)
    }

    /// Parses every migration for `queue` and describes its steps, without touching the
    /// broker. Fails on a bad queue name or a malformed migration file.
    pub fn plan(&self, queue: &str) -> Result<Vec<PlannedMigration>, BrokerError> {
        let specs = self.parsed(queue)?;
        Ok(self
            .list
            .iter()
            .zip(specs)
            .map(|(migration, spec)| PlannedMigration {
                version: migration.version,
                name: migration.name.clone(),
                additive: spec.additive,
                description: spec.description.clone(),
                steps: spec.steps(),
            })
            .collect())
    }

    /// Applies every migration above the broker's current version for `queue`, in order, and
    /// records each one on the broker; then re-declares any exchange or queue of the resulting
    /// topology that has gone missing (with its bindings), so that "run `retoucher migrate`" is
    /// the answer to every [`Migrations::verify`] failure. Running it again changes nothing.
    /// A broker at a newer version than this set knows is left alone when the newer versions
    /// are all additive (an older `migrate`, as in a rollback, is then a no-op), and refused
    /// otherwise: an old binary must not "repair" a topology a newer one has changed.
    pub async fn migrate(
        &self,
        conn: &Connection,
        queue: &str,
    ) -> Result<MigrationReport, BrokerError> {
        self.migrate_to(conn, queue, self.latest()).await
    }

    /// [`Migrations::migrate`], but only up to `target`: what an older binary would have left
    /// behind. Lets tests (and an operator rolling out in steps) put a broker at an
    /// intermediate version. A broker already at or past `target` gets only the repair of the
    /// versions up to `target`; nothing is ever rolled back.
    pub async fn migrate_to(
        &self,
        conn: &Connection,
        queue: &str,
        target: u32,
    ) -> Result<MigrationReport, BrokerError> {
        let latest = self.latest();
        if target > latest {
            return Err(BrokerError::InvalidMigration {
                name: format!("version {target}"),
                reason: format!("the {} migrations go up to {latest}", self.source),
            });
        }
        // Parse everything before declaring anything: a bad file must not leave half a version.
        let specs = self.parsed(queue)?;
        let from = current_version(conn, queue).await?;
        if from > latest {
            self.check_ahead(conn, queue, from).await?;
        }
        let upto = target as usize;
        let mut applied = Vec::new();
        for (migration, spec) in self.list.iter().zip(&specs).take(upto) {
            if migration.version <= from {
                continue;
            }
            tracing::info!(
                queue,
                version = migration.version,
                name = migration.name.as_str(),
                additive = spec.additive,
                "applying broker migration"
            );
            apply(conn, queue, migration, spec).await?;
            applied.push((migration.version, migration.name.clone()));
        }
        // Repair what the broker's version promises, not what this set could add (and of a
        // broker ahead of this set, what this set knows: the later versions only added).
        let reached = from.max(target).min(latest) as usize;
        let repaired = repair(conn, queue, &self.list[..reached], &specs[..reached]).await?;
        Ok(MigrationReport {
            queue: queue.to_owned(),
            from,
            to: from.max(target),
            known: latest,
            applied,
            repaired,
        })
    }

    /// Checks that the broker's topology for `queue` is one this set can work with, and that
    /// every exchange and queue the set declares exists (someone may have deleted one by hand).
    /// Returns the broker's version. The worker calls this before consuming.
    ///
    /// The broker may be at this set's latest version, or past it when every newer version is
    /// additive (a rolling upgrade: the broker was migrated, this worker is not replaced yet).
    /// It may not be behind (this worker may use what a missing version adds), nor past it by a
    /// version that is not additive.
    pub async fn verify(&self, conn: &Connection, queue: &str) -> Result<u32, BrokerError> {
        let specs = self.parsed(queue)?;
        let latest = self.latest();
        let current = current_version(conn, queue).await?;
        if current < latest {
            return Err(BrokerError::TopologyBehind {
                queue: queue.to_owned(),
                current,
                needed: latest,
            });
        }
        if current > latest {
            self.check_ahead(conn, queue, current).await?;
            tracing::info!(
                queue,
                broker = current,
                known = latest,
                "the broker topology is ahead of this worker by additive versions only: consuming"
            );
        }
        let state = FinalState::of(&specs);
        for exchange in &state.exchanges {
            if !exists(conn, Entity::Exchange, &exchange.name).await? {
                return Err(missing(
                    queue,
                    current,
                    format!("exchange `{}`", exchange.name),
                ));
            }
        }
        for declared in &state.queues {
            if !exists(conn, Entity::Queue, &declared.name).await? {
                return Err(missing(
                    queue,
                    current,
                    format!("queue `{}`", declared.name),
                ));
            }
        }
        Ok(current)
    }

    /// For a broker at `current`, past this set's latest version: `Ok` when every version in
    /// between is recorded as additive, else the newest one that is not, as the version a
    /// worker needs.
    async fn check_ahead(
        &self,
        conn: &Connection,
        queue: &str,
        current: u32,
    ) -> Result<(), BrokerError> {
        let known = self.latest();
        let mut needed = None;
        for version in (known + 1..=current).rev() {
            if !exists(conn, Entity::Exchange, &additive_marker(queue, version)).await? {
                needed = Some(version);
                break;
            }
        }
        match needed {
            None => Ok(()),
            Some(needed) => Err(BrokerError::TopologyAhead {
                queue: queue.to_owned(),
                current,
                known,
                needed,
            }),
        }
    }

    /// The names of every queue of this set's topology for `queue` (jobs, dead letters, delay
    /// queues…), e.g. for tests and tools that tear a deployment down.
    pub fn queue_names(&self, queue: &str) -> Result<Vec<String>, BrokerError> {
        let specs = self.parsed(queue)?;
        Ok(FinalState::of(&specs)
            .queues
            .iter()
            .map(|q| q.name.clone())
            .collect())
    }

    /// The retry delay queues of this set's topology for `queue`, in step order, with their
    /// TTL (`x-message-ttl`): `{queue}.retry.1`, `{queue}.retry.2`, … as far as they go without
    /// a gap. The worker takes its backoff ladder from here, so the ladder is written down
    /// once, in the migration files. Empty before any migration declares one.
    pub fn delay_queues(
        &self,
        queue: &str,
    ) -> Result<Vec<(String, std::time::Duration)>, BrokerError> {
        let specs = self.parsed(queue)?;
        let state = FinalState::of(&specs);
        let mut out = Vec::new();
        for step in 1.. {
            let name = super::delay_queue(queue, step);
            let Some(declared) = state.queues.iter().find(|q| q.name == name) else {
                break;
            };
            let ttl = match declared.arguments.inner().get("x-message-ttl") {
                Some(AMQPValue::LongLongInt(ms)) if *ms > 0 => *ms as u64,
                _ => {
                    return Err(BrokerError::InvalidMigration {
                        name: format!("delay queue `{name}`"),
                        reason: "it needs a positive integer `x-message-ttl`".to_owned(),
                    })
                }
            };
            out.push((name, std::time::Duration::from_millis(ttl)));
        }
        Ok(out)
    }
}

/// The version this binary brings the broker to.
pub fn latest_version() -> u32 {
    EMBEDDED.len() as u32
}

/// The marker exchange that records `version` as applied for `queue`.
pub fn marker_exchange(queue: &str, version: u32) -> String {
    format!("{queue}.topology.v{version:04}")
}

/// The marker exchange that records `version`, applied for `queue`, as additive: workers of
/// earlier versions may go on consuming.
pub fn additive_marker(queue: &str, version: u32) -> String {
    format!("{}.additive", marker_exchange(queue, version))
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub queue: String,
    /// The broker's version before the run.
    pub from: u32,
    /// The broker's version after the run (the latest the set knows, for [`migrate`], or the
    /// broker's own when it was ahead).
    pub to: u32,
    /// The latest version the set knows.
    pub known: u32,
    /// `(version, name)` of each migration applied, in order; empty when already up to date.
    pub applied: Vec<(u32, String)>,
    /// Exchanges and queues of earlier versions that had gone missing (deleted by hand) and
    /// were declared again, e.g. "queue `retoucher.jobs.dead`".
    pub repaired: Vec<String>,
}

impl fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.applied.is_empty() {
            write!(
                f,
                "broker topology for `{}` is up to date (version {})",
                self.queue, self.to
            )?;
            if self.to > self.known {
                write!(
                    f,
                    ", ahead of this binary's version {} by additive versions only: nothing to do",
                    self.known
                )?;
            }
        } else {
            let names: Vec<&str> = self.applied.iter().map(|(_, name)| name.as_str()).collect();
            write!(
                f,
                "broker topology for `{}` migrated from version {} to {} ({})",
                self.queue,
                self.from,
                self.to,
                names.join(", ")
            )?;
        }
        if !self.repaired.is_empty() {
            write!(f, "; re-declared missing {}", self.repaired.join(", "))?;
        }
        Ok(())
    }
}

/// One migration resolved for a queue name: what `retoucher migrate --dry-run` would show.
#[derive(Debug, Clone)]
pub struct PlannedMigration {
    pub version: u32,
    pub name: String,
    /// Whether workers of earlier versions keep working on it.
    pub additive: bool,
    pub description: String,
    /// One line per declare, in the order they run.
    pub steps: Vec<String>,
}

/// [`Migrations::plan`] of the built-in migrations.
pub fn plan(queue: &str) -> Result<Vec<PlannedMigration>, BrokerError> {
    Migrations::embedded().plan(queue)
}

/// [`Migrations::migrate`] with the built-in migrations.
pub async fn migrate(conn: &Connection, queue: &str) -> Result<MigrationReport, BrokerError> {
    Migrations::embedded().migrate(conn, queue).await
}

/// [`Migrations::migrate_to`] with the built-in migrations.
pub async fn migrate_to(
    conn: &Connection,
    queue: &str,
    target: u32,
) -> Result<MigrationReport, BrokerError> {
    Migrations::embedded().migrate_to(conn, queue, target).await
}

/// [`Migrations::verify`] with the built-in migrations.
pub async fn verify(conn: &Connection, queue: &str) -> Result<u32, BrokerError> {
    Migrations::embedded().verify(conn, queue).await
}

/// [`Migrations::queue_names`] of the built-in migrations.
pub fn queue_names(queue: &str) -> Result<Vec<String>, BrokerError> {
    Migrations::embedded().queue_names(queue)
}

/// [`Migrations::delay_queues`] of the built-in migrations.
pub fn delay_queues(queue: &str) -> Result<Vec<(String, std::time::Duration)>, BrokerError> {
    Migrations::embedded().delay_queues(queue)
}

fn missing(queue: &str, version: u32, what: String) -> BrokerError {
    BrokerError::TopologyIncomplete {
        queue: queue.to_owned(),
        version,
        what,
    }
}

/// The highest version recorded on the broker for `queue` (0 when none): passive-declares the
/// markers v0001, v0002, … until one is missing. Probing past a set's latest version is what
/// reveals a broker migrated by a newer binary.
pub async fn current_version(conn: &Connection, queue: &str) -> Result<u32, BrokerError> {
    check_queue_name(queue)?;
    let channel = open_channel(conn).await?;
    let mut version = 0;
    loop {
        let marker = marker_exchange(queue, version + 1);
        let probe = channel
            .exchange_declare(
                short_string(&marker)?,
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match probe {
            Ok(()) => version += 1,
            // The broker closed this channel with the 404; nothing more to ask on it.
            Err(error) if is_not_found(&error) => return Ok(version),
            Err(error) => {
                return Err(BrokerError::amqp(
                    format!("checking topology marker `{marker}`"),
                    error,
                ))
            }
        }
    }
}

/// Applies one migration on its own channel, markers last: the additive marker (when it is),
/// then the version marker, so that no version is ever recorded without what it says of itself.
async fn apply(
    conn: &Connection,
    queue: &str,
    migration: &Migration,
    spec: &Spec,
) -> Result<(), BrokerError> {
    let channel = open_channel(conn).await?;
    for exchange in &spec.exchanges {
        declare_exchange(&channel, exchange)
            .await
            .map_err(|e| step_error(migration, e))?;
    }
    for declared in &spec.queues {
        declare_queue(&channel, declared)
            .await
            .map_err(|e| step_error(migration, e))?;
    }
    for binding in &spec.bindings {
        bind(&channel, binding)
            .await
            .map_err(|e| step_error(migration, e))?;
    }
    if spec.additive {
        declare_marker(&channel, &additive_marker(queue, migration.version))
            .await
            .map_err(|e| step_error(migration, e))?;
    }
    declare_marker(&channel, &marker_exchange(queue, migration.version))
        .await
        .map_err(|e| step_error(migration, e))?;
    close_quietly(&channel).await;
    Ok(())
}

/// Declares a marker exchange: durable, and internal, so nothing can publish to it; it only
/// records a fact about the topology by existing.
async fn declare_marker(channel: &Channel, marker: &str) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            short_string(marker)?,
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                internal: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| BrokerError::amqp(format!("recording topology marker `{marker}`"), e))
}

/// Re-declares the exchanges and queues of the final topology that no longer exist, and the
/// bindings that went with them (a binding dies with its queue or exchange), and the additive
/// markers of the applied versions that are (a broker migrated before they existed has none).
/// Only what is missing is touched: re-running old declarations wholesale would clash with
/// later versions that changed them.
async fn repair(
    conn: &Connection,
    queue: &str,
    migrations: &[Migration],
    specs: &[Spec],
) -> Result<Vec<String>, BrokerError> {
    let state = FinalState::of(specs);
    let mut repaired = Vec::new();
    let mut recreated: HashSet<&str> = HashSet::new();
    let channel = open_channel(conn).await?;
    for exchange in &state.exchanges {
        if !exists(conn, Entity::Exchange, &exchange.name).await? {
            declare_exchange(&channel, exchange).await?;
            recreated.insert(&exchange.name);
            repaired.push(format!("exchange `{}`", exchange.name));
        }
    }
    for declared in &state.queues {
        if !exists(conn, Entity::Queue, &declared.name).await? {
            declare_queue(&channel, declared).await?;
            recreated.insert(&declared.name);
            repaired.push(format!("queue `{}`", declared.name));
        }
    }
    for binding in &state.bindings {
        if recreated.contains(binding.queue.as_str())
            || recreated.contains(binding.exchange.as_str())
        {
            bind(&channel, binding).await?;
        }
    }
    for (migration, spec) in migrations.iter().zip(specs) {
        let marker = additive_marker(queue, migration.version);
        if spec.additive && !exists(conn, Entity::Exchange, &marker).await? {
            declare_marker(&channel, &marker).await?;
            tracing::info!(marker = marker.as_str(), "recorded an additive version");
        }
    }
    close_quietly(&channel).await;
    for what in &repaired {
        tracing::warn!(what = what.as_str(), "re-declared missing broker topology");
    }
    Ok(repaired)
}

async fn declare_exchange(channel: &Channel, exchange: &ExchangeSpec) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            short_string(&exchange.name)?,
            exchange.kind.to_lapin(),
            ExchangeDeclareOptions {
                durable: exchange.durable,
                ..ExchangeDeclareOptions::default()
            },
            exchange.arguments.clone(),
        )
        .await
        .map_err(|e| BrokerError::amqp(format!("declaring exchange `{}`", exchange.name), e))
}

async fn declare_queue(channel: &Channel, declared: &QueueSpec) -> Result<(), BrokerError> {
    channel
        .queue_declare(
            short_string(&declared.name)?,
            QueueDeclareOptions {
                durable: declared.durable,
                ..QueueDeclareOptions::default()
            },
            declared.arguments.clone(),
        )
        .await
        .map(drop)
        .map_err(|e| BrokerError::amqp(format!("declaring queue `{}`", declared.name), e))
}

async fn bind(channel: &Channel, binding: &BindingSpec) -> Result<(), BrokerError> {
    channel
        .queue_bind(
            short_string(&binding.queue)?,
            short_string(&binding.exchange)?,
            short_string(&binding.routing_key)?,
            QueueBindOptions::default(),
            binding.arguments.clone(),
        )
        .await
        .map_err(|e| {
            BrokerError::amqp(
                format!(
                    "binding queue `{}` to exchange `{}` with `{}`",
                    binding.queue, binding.exchange, binding.routing_key
                ),
                e,
            )
        })
}

#[derive(Clone, Copy)]
enum Entity {
    Exchange,
    Queue,
}

/// Whether an exchange or queue exists, by passive declare on a channel of its own: the
/// broker closes the channel when the answer is no.
async fn exists(conn: &Connection, entity: Entity, name: &str) -> Result<bool, BrokerError> {
    let channel = open_channel(conn).await?;
    let passive = match entity {
        Entity::Exchange => {
            channel
                .exchange_declare(
                    short_string(name)?,
                    // The kind is not checked by a passive declare.
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
        }
        Entity::Queue => channel
            .queue_declare(
                short_string(name)?,
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map(drop),
    };
    match passive {
        Ok(()) => {
            close_quietly(&channel).await;
            Ok(true)
        }
        Err(error) if is_not_found(&error) => Ok(false),
        Err(error) => Err(BrokerError::amqp(format!("checking `{name}`"), error)),
    }
}

/// The topology after every migration: the last declaration of each name wins.
struct FinalState<'a> {
    exchanges: Vec<&'a ExchangeSpec>,
    queues: Vec<&'a QueueSpec>,
    bindings: Vec<&'a BindingSpec>,
}

impl<'a> FinalState<'a> {
    fn of(specs: &'a [Spec]) -> Self {
        fn upsert<'a, T>(list: &mut Vec<&'a T>, item: &'a T, same: impl Fn(&T) -> bool) {
            match list.iter().position(|existing| same(existing)) {
                Some(i) => list[i] = item,
                None => list.push(item),
            }
        }
        let mut state = FinalState {
            exchanges: Vec::new(),
            queues: Vec::new(),
            bindings: Vec::new(),
        };
        for spec in specs {
            for e in &spec.exchanges {
                upsert(&mut state.exchanges, e, |x| x.name == e.name);
            }
            for q in &spec.queues {
                upsert(&mut state.queues, q, |x| x.name == q.name);
            }
            for b in &spec.bindings {
                upsert(&mut state.bindings, b, |x| {
                    x.queue == b.queue && x.exchange == b.exchange && x.routing_key == b.routing_key
                });
            }
        }
        state
    }
}

fn step_error(migration: &Migration, error: BrokerError) -> BrokerError {
    match error {
        BrokerError::Amqp { operation, error } => BrokerError::Amqp {
            operation: format!("migration {}: {operation}", migration.name),
            error,
        },
        other => other,
    }
}

async fn open_channel(conn: &Connection) -> Result<Channel, BrokerError> {
    conn.create_channel()
        .await
        .map_err(|e| BrokerError::amqp("opening a channel", e))
}

/// Closes a channel we are done with; a failure only means it is already gone.
async fn close_quietly(channel: &Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "done".into()).await;
    }
}

fn check_queue_name(queue: &str) -> Result<(), BrokerError> {
    let invalid = |reason: &str| BrokerError::InvalidName {
        name: queue.chars().take(64).collect(),
        reason: reason.to_owned(),
    };
    if queue.is_empty() {
        return Err(invalid("the jobs queue name is empty"));
    }
    if queue.len() + LONGEST_SUFFIX > 255 {
        return Err(invalid(&format!(
            "the jobs queue name is {} bytes, at most {} are allowed",
            queue.len(),
            255 - LONGEST_SUFFIX
        )));
    }
    if queue.starts_with("amq.") {
        return Err(invalid(
            "names starting with `amq.` are reserved by the broker",
        ));
    }
    Ok(())
}

/// A migration file, parsed and with `{queue}` substituted.
#[derive(Debug)]
struct Spec {
    description: String,
    additive: bool,
    exchanges: Vec<ExchangeSpec>,
    queues: Vec<QueueSpec>,
    bindings: Vec<BindingSpec>,
}

#[derive(Debug)]
struct ExchangeSpec {
    name: String,
    kind: Kind,
    durable: bool,
    arguments: FieldTable,
}

#[derive(Debug)]
struct QueueSpec {
    name: String,
    durable: bool,
    arguments: FieldTable,
}

#[derive(Debug)]
struct BindingSpec {
    queue: String,
    exchange: String,
    routing_key: String,
    arguments: FieldTable,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl Kind {
    fn to_lapin(self) -> ExchangeKind {
        match self {
            Kind::Direct => ExchangeKind::Direct,
            Kind::Fanout => ExchangeKind::Fanout,
            Kind::Topic => ExchangeKind::Topic,
            Kind::Headers => ExchangeKind::Headers,
        }
    }
}

/// The file as written, before substitution.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    description: String,
    additive: bool,
    #[serde(default, rename = "exchange")]
    exchanges: Vec<RawExchange>,
    #[serde(default, rename = "queue")]
    queues: Vec<RawQueue>,
    #[serde(default, rename = "binding")]
    bindings: Vec<RawBinding>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExchange {
    name: String,
    kind: Kind,
    #[serde(default = "durable_by_default")]
    durable: bool,
    #[serde(default)]
    arguments: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    name: String,
    #[serde(default = "durable_by_default")]
    durable: bool,
    #[serde(default)]
    arguments: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBinding {
    queue: String,
    exchange: String,
    routing_key: String,
    #[serde(default)]
    arguments: toml::Table,
}

/// Topology that vanishes with a broker restart has no place in a migration.
fn durable_by_default() -> bool {
    true
}

impl Spec {
    fn parse(migration: &Migration, queue: &str) -> Result<Spec, BrokerError> {
        let invalid = |reason: String| BrokerError::InvalidMigration {
            name: migration.name.to_owned(),
            reason,
        };
        let raw: RawSpec = toml::from_str(&migration.text).map_err(|e| invalid(e.to_string()))?;
        let name = |template: &str| template.replace(QUEUE_PLACEHOLDER, queue);
        let arguments = |table: &toml::Table| -> Result<FieldTable, BrokerError> {
            let mut out = FieldTable::default();
            for (key, value) in table {
                let value = match value {
                    toml::Value::String(s) => AMQPValue::LongString(LongString::from(name(s))),
                    toml::Value::Integer(i) => AMQPValue::LongLongInt(*i),
                    toml::Value::Boolean(b) => AMQPValue::Boolean(*b),
                    other => {
                        return Err(invalid(format!(
                            "argument `{key}` is a {}, only strings, integers and booleans are supported",
                            other.type_str()
                        )))
                    }
                };
                out.insert(short_string(key)?, value);
            }
            Ok(out)
        };
        let spec = Spec {
            description: raw.description,
            additive: raw.additive,
            exchanges: raw
                .exchanges
                .iter()
                .map(|e| {
                    Ok(ExchangeSpec {
                        name: name(&e.name),
                        kind: e.kind,
                        durable: e.durable,
                        arguments: arguments(&e.arguments)?,
                    })
                })
                .collect::<Result<_, BrokerError>>()?,
            queues: raw
                .queues
                .iter()
                .map(|q| {
                    Ok(QueueSpec {
                        name: name(&q.name),
                        durable: q.durable,
                        arguments: arguments(&q.arguments)?,
                    })
                })
                .collect::<Result<_, BrokerError>>()?,
            bindings: raw
                .bindings
                .iter()
                .map(|b| {
                    Ok(BindingSpec {
                        queue: name(&b.queue),
                        exchange: name(&b.exchange),
                        routing_key: name(&b.routing_key),
                        arguments: arguments(&b.arguments)?,
                    })
                })
                .collect::<Result<_, BrokerError>>()?,
        };
        // Catch over-long names now rather than half-way through applying the file.
        for n in spec
            .exchanges
            .iter()
            .map(|e| &e.name)
            .chain(spec.queues.iter().map(|q| &q.name))
            .chain(
                spec.bindings
                    .iter()
                    .flat_map(|b| [&b.queue, &b.exchange, &b.routing_key]),
            )
        {
            short_string(n)?;
        }
        Ok(spec)
    }

    /// What this version declares, by kind and name, to compare with earlier versions.
    fn declared_names(&self) -> Vec<String> {
        let exchanges = self
            .exchanges
            .iter()
            .map(|e| format!("exchange `{}`", e.name));
        let queues = self.queues.iter().map(|q| format!("queue `{}`", q.name));
        let bindings = self.bindings.iter().map(|b| {
            format!(
                "the binding of queue `{}` to exchange `{}` with `{}`",
                b.queue, b.exchange, b.routing_key
            )
        });
        exchanges.chain(queues).chain(bindings).collect()
    }

    fn steps(&self) -> Vec<String> {
        let durability = |durable: bool| if durable { "durable" } else { "transient" };
        let exchanges = self.exchanges.iter().map(|e| {
            format!(
                "declare {} {:?} exchange `{}`{}",
                durability(e.durable),
                e.kind,
                e.name,
                describe_arguments(&e.arguments)
            )
        });
        let queues = self.queues.iter().map(|q| {
            format!(
                "declare {} queue `{}`{}",
                durability(q.durable),
                q.name,
                describe_arguments(&q.arguments)
            )
        });
        let bindings = self.bindings.iter().map(|b| {
            format!(
                "bind queue `{}` to exchange `{}` with routing key `{}`{}",
                b.queue,
                b.exchange,
                b.routing_key,
                describe_arguments(&b.arguments)
            )
        });
        exchanges.chain(queues).chain(bindings).collect()
    }
}

fn describe_arguments(arguments: &FieldTable) -> String {
    if arguments.inner().is_empty() {
        return String::new();
    }
    let parts: Vec<String> = arguments
        .inner()
        .iter()
        .map(|(key, value)| {
            let value = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::LongLongInt(i) => i.to_string(),
                AMQPValue::Boolean(b) => b.to_string(),
                other => format!("{other:?}"),
            };
            format!("{key}={value}")
        })
        .collect();
    format!(" ({})", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    const BASE: &str = r#"
description = "base"
additive = false
[[queue]]
name = "{queue}"
"#;

    #[test]
    fn the_built_in_migrations_say_whether_they_are_additive() {
        let built_in = Migrations::embedded();
        assert_eq!(built_in.latest(), latest_version());
        let plan = built_in.plan("retoucher.jobs").unwrap();
        assert!(!plan[0].additive, "the base topology");
        assert!(plan[1].additive, "the delay queues only add queues");
    }

    #[test]
    fn a_folder_is_numbered_from_one_without_gaps() {
        let extra = r#"
description = "an audit queue"
additive = true
[[queue]]
name = "{queue}.audit"
"#;
        let dir = folder(&[
            ("0001_base.toml", BASE),
            ("0002_audit.toml", extra),
            ("README.md", "not a migration"),
        ]);
        let set = Migrations::from_dir(dir.path()).unwrap();
        assert_eq!(set.latest(), 2);
        assert_eq!(set.iter().nth(1).unwrap().name, "0002_audit");
        assert_eq!(
            set.queue_names("q").unwrap(),
            vec!["q".to_owned(), "q.audit".to_owned()]
        );

        let gap = folder(&[("0001_base.toml", BASE), ("0003_audit.toml", extra)]);
        let err = Migrations::from_dir(gap.path()).unwrap_err().to_string();
        assert!(err.contains("expected version 2"), "{err}");
        let empty = folder(&[]);
        assert!(Migrations::from_dir(empty.path()).is_err());
        assert!(Migrations::configured(Path::new("")).unwrap().source() == "built-in");
    }

    #[test]
    fn an_additive_migration_may_not_declare_again_what_exists() {
        let changed = r#"
description = "the jobs queue, changed"
additive = true
[[queue]]
name = "{queue}"
[queue.arguments]
x-max-length = 10
"#;
        let dir = folder(&[("0001_base.toml", BASE), ("0002_changed.toml", changed)]);
        let err = Migrations::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("0002_changed")
                && err.contains("additive")
                && err.contains("queue `retoucher.jobs`"),
            "{err}"
        );
        // The same change, declared for what it is, is accepted.
        let honest = changed.replace("additive = true", "additive = false");
        let dir = folder(&[("0001_base.toml", BASE), ("0002_changed.toml", &honest)]);
        assert!(Migrations::from_dir(dir.path()).is_ok());
        // And every file must say which it is.
        let unsaid = BASE.replace("additive = false\n", "");
        let dir = folder(&[("0001_base.toml", &unsaid)]);
        let err = Migrations::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("additive"), "{err}");
    }

    #[test]
    fn markers_fit_the_longest_allowed_queue_name() {
        let longest = "q".repeat(255 - LONGEST_SUFFIX);
        assert!(plan(&longest).is_ok());
        assert_eq!(additive_marker(&longest, 9999).len(), 255);
        assert!(plan(&format!("{longest}q")).is_err());
    }
}
