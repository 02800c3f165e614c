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

use std::{collections::HashSet, fmt};

use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString},
    Channel, Connection, ExchangeKind,
};
use serde::Deserialize;

use super::{is_not_found, short_string, BrokerError};

/// One embedded migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub text: &'static str,
}

/// Every migration this binary knows, in version order, starting at 1 without gaps.
/// A released file is never edited: a change is a new file with the next number.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_initial",
        text: include_str!("../../migrations/0001_initial.toml"),
    },
    Migration {
        version: 2,
        name: "0002_retry_delays",
        text: include_str!("../../migrations/0002_retry_delays.toml"),
    },
];

/// The placeholder for the jobs queue name in migration files.
const QUEUE_PLACEHOLDER: &str = "{queue}";

/// The longest suffix added to the queue name (`.topology.v0001`); AMQP names stop at 255 bytes.
const LONGEST_SUFFIX: usize = ".topology.v0000".len();

/// The version this binary brings the broker to.
pub fn latest_version() -> u32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// The marker exchange that records `version` as applied for `queue`.
pub fn marker_exchange(queue: &str, version: u32) -> String {
    format!("{queue}.topology.v{version:04}")
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub queue: String,
    /// The broker's version before the run.
    pub from: u32,
    /// The broker's version after the run (the latest this binary knows, for [`migrate`]).
    pub to: u32,
    /// `(version, name)` of each migration applied, in order; empty when already up to date.
    pub applied: Vec<(u32, &'static str)>,
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
        } else {
            let names: Vec<&str> = self.applied.iter().map(|(_, name)| *name).collect();
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
    pub name: &'static str,
    pub description: String,
    /// One line per declare, in the order they run.
    pub steps: Vec<String>,
}

/// Parses every embedded migration for `queue` and describes its steps, without touching the
/// broker. Fails on a bad queue name or a malformed migration file.
pub fn plan(queue: &str) -> Result<Vec<PlannedMigration>, BrokerError> {
    check_queue_name(queue)?;
    MIGRATIONS
        .iter()
        .map(|migration| {
            let spec = Spec::parse(migration, queue)?;
            Ok(PlannedMigration {
                version: migration.version,
                name: migration.name,
                description: spec.description.clone(),
                steps: spec.steps(),
            })
        })
        .collect()
}

/// Applies every migration above the broker's current version for `queue`, in order, and
/// records each one on the broker; then re-declares any exchange or queue of the resulting
/// topology that has gone missing (with its bindings), so that "run `retoucher migrate`" is
/// the answer to every [`verify`] failure. Running it again changes nothing. Refuses to touch
/// a broker at a newer version than this binary knows: an old binary must not "repair" a
/// topology that a newer one has moved on from.
pub async fn migrate(conn: &Connection, queue: &str) -> Result<MigrationReport, BrokerError> {
    migrate_to(conn, queue, latest_version()).await
}

/// [`migrate`], but only up to `target`: what an older binary would have left behind. Lets
/// tests (and an operator rolling out in steps) put a broker at an intermediate version.
/// A broker already at or past `target` (but not past this binary) gets only the repair of
/// the versions up to `target`; nothing is ever rolled back.
pub async fn migrate_to(
    conn: &Connection,
    queue: &str,
    target: u32,
) -> Result<MigrationReport, BrokerError> {
    let latest = latest_version();
    if target > latest {
        return Err(BrokerError::InvalidMigration {
            name: format!("version {target}"),
            reason: format!("this binary knows versions up to {latest}"),
        });
    }
    // Parse everything before declaring anything: a bad file must not leave half a version.
    let specs = parsed(queue)?;
    let from = current_version(conn, queue).await?;
    if from > latest {
        return Err(BrokerError::TopologyAhead {
            queue: queue.to_owned(),
            current: from,
            known: latest,
        });
    }
    let upto = target as usize;
    let mut applied = Vec::new();
    for (migration, spec) in MIGRATIONS.iter().zip(&specs).take(upto) {
        if migration.version <= from {
            continue;
        }
        tracing::info!(
            queue,
            version = migration.version,
            name = migration.name,
            "applying broker migration"
        );
        apply(conn, queue, migration, spec).await?;
        applied.push((migration.version, migration.name));
    }
    // Repair what the broker's version promises, not what this binary could add.
    let reached = from.max(target) as usize;
    let repaired = repair(conn, &specs[..reached]).await?;
    Ok(MigrationReport {
        queue: queue.to_owned(),
        from,
        to: from.max(target),
        applied,
        repaired,
    })
}

/// Checks that the broker is exactly at this binary's latest version for `queue` and that
/// every exchange and queue the migrations declare exists (someone may have deleted one by
/// hand). Returns the version. The worker calls this before consuming.
pub async fn verify(conn: &Connection, queue: &str) -> Result<u32, BrokerError> {
    let specs = parsed(queue)?;
    let latest = latest_version();
    let current = current_version(conn, queue).await?;
    if current < latest {
        return Err(BrokerError::TopologyBehind {
            queue: queue.to_owned(),
            current,
            needed: latest,
        });
    }
    if current > latest {
        return Err(BrokerError::TopologyAhead {
            queue: queue.to_owned(),
            current,
            known: latest,
        });
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

/// The names of every queue of the latest topology for `queue` (jobs, dead letters, delay
/// queues…), e.g. for tests and tools that tear a deployment down.
pub fn queue_names(queue: &str) -> Result<Vec<String>, BrokerError> {
    let specs = parsed(queue)?;
    Ok(FinalState::of(&specs)
        .queues
        .iter()
        .map(|q| q.name.clone())
        .collect())
}

/// The retry delay queues of the latest topology for `queue`, in step order, with their TTL
/// (`x-message-ttl`): `{queue}.retry.1`, `{queue}.retry.2`, … as far as they go without a gap.
/// The worker takes its backoff ladder from here, so the ladder is written down once, in the
/// migration files. Empty before any migration declares one.
pub fn delay_queues(queue: &str) -> Result<Vec<(String, std::time::Duration)>, BrokerError> {
    let specs = parsed(queue)?;
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

fn missing(queue: &str, version: u32, what: String) -> BrokerError {
    BrokerError::TopologyIncomplete {
        queue: queue.to_owned(),
        version,
        what,
    }
}

/// The highest version recorded on the broker for `queue` (0 when none): passive-declares the
/// markers v0001, v0002, … until one is missing. Probing past this binary's latest version is
/// what reveals a broker migrated by a newer binary.
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

/// Applies one migration on its own channel, marker last.
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
    // Internal: nothing can publish to a marker, it only records that this version is done.
    let marker = marker_exchange(queue, migration.version);
    channel
        .exchange_declare(
            short_string(&marker)?,
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                internal: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            step_error(
                migration,
                BrokerError::amqp(format!("recording version marker `{marker}`"), e),
            )
        })?;
    close_quietly(&channel).await;
    Ok(())
}

/// Re-declares the exchanges and queues of the final topology that no longer exist, and the
/// bindings that went with them (a binding dies with its queue or exchange). Only what is
/// missing is touched: re-running old declarations wholesale would clash with later versions
/// that changed them.
async fn repair(conn: &Connection, specs: &[Spec]) -> Result<Vec<String>, BrokerError> {
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

fn parsed(queue: &str) -> Result<Vec<Spec>, BrokerError> {
    check_queue_name(queue)?;
    MIGRATIONS.iter().map(|m| Spec::parse(m, queue)).collect()
}

/// A migration file, parsed and with `{queue}` substituted.
#[derive(Debug)]
struct Spec {
    description: String,
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
        let raw: RawSpec = toml::from_str(migration.text).map_err(|e| invalid(e.to_string()))?;
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
