//! The commands: `serve` starts the data and control planes; the others
//! (`keygen`, `init`, `gen`, `inspect`, `decode`, `get`) are short offline
//! jobs. Each takes its parsed flags and returns an error for `main` to
//! print once.

use std::io::Write;
use std::net::ToSocketAddrs;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tradeid::client::{Client, ClientConfig, ClientError};
use tradeid::id::{Id, ID_LEN};
use tradeid::keyfile::SpaceKey;
use tradeid::protocol::MAX_BATCH_LIMIT;
use tradeid::state::{self, ClusterBinding, Geometry, Header, Snapshot, StateError, Store};
use tradeid::{GenError, Generator, GeneratorConfig};

use crate::cluster::{self, Etcd};
use crate::config::{cluster_options, ServeConfig};
use crate::errors::{ConfigError, Exhausted, InvalidIds, Unreachable};
use crate::flags::{
    CheckArgs, Cli, Command, DecodeArgs, GenArgs, GetArgs, InitArgs, InspectArgs, KeygenArgs, RaiseMarksArgs, ServeArgs,
};
use crate::{control, dataplane};

/// `println!` that returns a failed write as an error instead of
/// panicking (a panic aborts the release build): a closed pipe (`| head`)
/// then ends the command quietly (see [`crate::exit::report`]).
macro_rules! say {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*).context(STDOUT)?
    };
}

/// What a failed write to standard output was doing.
const STDOUT: &str = "cannot write to standard output";

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keygen(args) => keygen(args),
        Command::Init(args) => init(args),
        Command::Serve(args) => serve(&args),
        Command::Get(args) => get(args),
        Command::Gen(args) => gen(args),
        Command::Inspect(args) => inspect(args),
        Command::Decode(args) => decode(args),
        Command::Check(args) => check(args),
        Command::RaiseMarks(args) => raise_marks(args),
    }
}

/// The counter width a new space gets unless told: 35 bits, or 30 when
/// the 7th character is a check character.
fn default_width(check_char: bool) -> u32 {
    if check_char {
        tradeid::check::DATA_BITS
    } else {
        Geometry::DEFAULT.width
    }
}

/// Refuses a width that does not fit six data characters.
fn check_char_width(check_char: bool, width: u32) -> Result<(), ConfigError> {
    if check_char && width > tradeid::check::DATA_BITS {
        return Err(ConfigError(format!(
            "--width {width} does not fit with --check-char: six data characters hold at most {} bits",
            tradeid::check::DATA_BITS
        )));
    }
    Ok(())
}

fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    let width = args.width.unwrap_or(default_width(args.check_char));
    check_char_width(args.check_char, width)?;
    let geometry = Geometry { width, shard_bits: args.shard_bits, node: 0, nodes: 1 };
    if let Err(reason) = geometry.validate() {
        bail!(ConfigError(format!("invalid --width/--shard-bits: {reason}")));
    }
    let key = SpaceKey::generate(width, args.shard_bits, args.check_char)
        .context("cannot read the OS random source for the key")?;
    key.write_new(&args.out)?;
    say!("created {} (space {})", args.out.display(), key.space_id());
    say!(
        "copy it to every node, then on node I of N: tradeid init --state FILE --node I --nodes N --key-file {}",
        args.out.display()
    );
    Ok(())
}

/// `TRADEID_ETCD_PASSWORD`, read here (the application layer) and
/// nowhere else.
fn etcd_password() -> Option<String> {
    std::env::var("TRADEID_ETCD_PASSWORD").ok()
}

fn init(args: InitArgs) -> anyhow::Result<()> {
    if let Some(options) = cluster_options(&args.etcd, etcd_password())? {
        return init_cluster_node(&args, &options);
    }
    let space = args.key_file.as_deref().map(SpaceKey::read).transpose()?;
    if space.is_none() && args.nodes > 1 && !args.sequential {
        bail!(ConfigError(format!(
            "--nodes {} needs a shared key (--key-file): every node of one ID space must permute counters with the \
             same key, or their IDs collide even though their counters never do. Create the key once, copy the \
             file to every node, and create each node's state from it:\n  \
             tradeid keygen --out space.key\n  \
             tradeid init --state FILE --node {} --nodes {} --key-file space.key",
            args.nodes, args.node, args.nodes
        )));
    }
    let from_key = |flag: &str, given: Option<u32>, in_key: Option<u32>, default: u32| {
        match (given, in_key) {
        (Some(g), Some(k)) if g != k => Err(ConfigError(format!(
            "--{flag} {g} differs from the key file's {flag} {k}; every node of a space uses the key's geometry (leave --{flag} out)"
        ))),
        (given, in_key) => Ok(given.or(in_key).unwrap_or(default)),
    }
    };
    let check_char = match space {
        Some(space) if args.check_char && !space.check_char => bail!(ConfigError(format!(
            "--check-char, but the key file {} defines a space without check characters; every node of a space \
             uses one format. Leave --check-char out, or make a new space with `tradeid keygen --check-char`",
            args.key_file.as_deref().unwrap_or(Path::new("")).display()
        ))),
        Some(space) => space.check_char,
        None => args.check_char,
    };
    let width = from_key("width", args.width, space.map(|k| k.width), default_width(check_char))?;
    check_char_width(check_char, width)?;
    let shard_bits =
        from_key("shard-bits", args.shard_bits, space.map(|k| k.shard_bits), Geometry::DEFAULT.shard_bits)?;
    let geometry = Geometry { width, shard_bits, node: args.node, nodes: args.nodes };
    if let Err(reason) = geometry.validate() {
        bail!(ConfigError(format!("invalid --node/--nodes/--width/--shard-bits: {reason}")));
    }
    let header = match space {
        Some(space) => Header::with_key(geometry, false, space.key),
        None => Header::new(geometry, args.sequential),
    }
    .context("cannot read the OS random source")?;
    let header = Header { check_char, ..header };
    state::create(&args.state, &header)?;
    for path in &args.state {
        say!("created {}", path.display());
    }
    say!(
        "space {}, node {} of {}: {} IDs in {} shards of {}{}{}",
        header.space_id(),
        geometry.node,
        geometry.nodes,
        geometry.node_capacity(),
        geometry.node_shards().count(),
        geometry.shard_size(),
        if args.sequential { ", sequential" } else { ", permuted" },
        if check_char { ", each ending in a check character" } else { "" }
    );
    Ok(())
}

fn gen(args: GenArgs) -> anyhow::Result<()> {
    let (store, _report) = Store::open(&args.state)?;
    store.check_standalone()?;
    // Blocks sized to the request: a one-off `gen -n 5` skips at most 5 IDs
    // (its unused prefetched block) instead of two default blocks.
    let block = args.count.clamp(1, GeneratorConfig::default().block_max);
    let config = GeneratorConfig { block_min: block, block_max: block, ..GeneratorConfig::default() };
    let generator = Generator::new(store, config);
    let mut handle = generator.handle().map_err(gen_error)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut buf = vec![0u8; 1024 * ID_LEN];
    let mut left = args.count;
    while left > 0 {
        let n = left.min(1024) as usize;
        handle.fill(&mut buf[..n * ID_LEN]).map_err(gen_error)?;
        for id in buf[..n * ID_LEN].chunks_exact(ID_LEN) {
            out.write_all(id).and_then(|()| out.write_all(b"\n")).context(STDOUT)?;
        }
        left -= n as u64;
    }
    out.flush().context(STDOUT)?;
    Ok(())
}

fn gen_error(e: GenError) -> anyhow::Error {
    match e {
        GenError::Exhausted => anyhow::anyhow!(Exhausted),
        e => anyhow::Error::new(e),
    }
}

fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    if let Some(options) = cluster_options(&args.etcd, etcd_password())? {
        return inspect_cluster(&options);
    }
    let path = &args.state[0];
    let snap = Snapshot::read(path)?;
    let h = &snap.header;
    let g = h.geometry;
    let capacity = g.node_capacity();
    let used = snap.used();
    let served = snap.served();
    let in_use: Vec<u32> = g.node_shards().filter(|&s| (1..g.shard_size()).contains(&snap.marks[s as usize])).collect();
    let full = g.node_shards().filter(|&s| snap.marks[s as usize] == g.shard_size()).count();
    let pct = |n: u64| 100.0 * n as f64 / capacity as f64;
    say!("state file     {}", path.display());
    say!("format         version 1, created at unix time {}", h.created_unix);
    say!(
        "ids            {}{}",
        if h.sequential { "sequential (identity permutation)" } else { "permuted (keyed Feistel)" },
        if h.check_char { ", 6 characters and a check character" } else { ", 7 characters, no check character" }
    );
    say!("geometry       2^{} IDs, {} shards of {}", g.width, g.shard_count(), g.shard_size());
    say!(
        "space          {}{}",
        h.space_id(),
        if h.records_space_id { "" } else { " (derived; not recorded by the tradeid that made this file)" }
    );
    say!("partition      node {} of {} ({} shards)", g.node, g.nodes, g.node_shards().count());
    if let Err(e) = h.check_servable(path) {
        say!("WARNING        {e}");
    }
    // Reserved is what no start will ever hand out again; served is what
    // was handed out.
    say!("reserved       {used} of {capacity} ({:.4}%)", pct(used));
    let unserved = if h.cluster.is_some() {
        "were reserved by this or other nodes of the cluster (this file's marks are floors under etcd's)"
    } else {
        "are held by a running server or were skipped at restarts"
    };
    say!("served         at least {served} ({:.4}%); the other {} reserved {unserved}", pct(served), used - served);
    say!("remaining      {} ({:.4}%)", capacity - used, pct(capacity - used));
    say!("shards         {} partly used, {full} full", in_use.len());
    if !in_use.is_empty() {
        let shown: Vec<String> = in_use
            .iter()
            .take(16)
            .map(|&s| format!("{s} ({} of {} reserved)", snap.marks[s as usize], g.shard_size()))
            .collect();
        let more = if in_use.len() > 16 { format!(", and {} more", in_use.len() - 16) } else { String::new() };
        say!("in use         {}{more}", shown.join(", "));
    }
    say!(
        "waste/restart  at most {} IDs per worker (2 blocks of --block-max {})",
        tradeid::generator::max_waste_per_restart(args.block_max, 1),
        args.block_max
    );
    if !snap.fell_back.is_empty() {
        say!("torn slots     {} shard(s) fell back to their older slot: {:?}", snap.fell_back.len(), snap.fell_back);
    }
    for mirror in &args.state[1..] {
        say!("mirror         {}: {}", mirror.display(), compare_mirror(&snap, mirror));
    }
    Ok(())
}

/// How a mirror stands against the first file (the server repairs a mirror
/// that is behind when it opens them together).
fn compare_mirror(first: &Snapshot, mirror: &std::path::Path) -> String {
    let other = match Snapshot::read(mirror) {
        Ok(other) => other,
        Err(e) => return format!("unreadable: {e}"),
    };
    if other.header != first.header {
        return "NOT a mirror of the first file (different header); never serve them together".into();
    }
    let behind = first.marks.iter().zip(&other.marks).filter(|(f, o)| o < f).count();
    let ahead = first.marks.iter().zip(&other.marks).filter(|(f, o)| o > f).count();
    match (behind, ahead) {
        (0, 0) => "in step".into(),
        _ => format!(
            "{behind} shard(s) behind and {ahead} ahead of the first file; the next serve repairs the one behind"
        ),
    }
}

fn decode(args: DecodeArgs) -> anyhow::Result<()> {
    let id = Id::parse(&args.id).map_err(|e| InvalidIds(format!("{:?} is not an ID: {e}", args.id)))?;
    let snap = Snapshot::read(&args.state[0])?;
    let (g, scheme) = (snap.header.geometry, snap.header.scheme());
    say!("id       {id}");
    say!("space    {}", snap.header.space_id());
    if !scheme.has_check_char() {
        say!("check    none: this space's IDs carry no check character");
    } else if id.has_valid_check() {
        say!("check    ok: the last character matches the first six");
    } else {
        say!("check    MISMATCH");
        bail!(InvalidIds(format!("{id}: {}", tradeid::id::ParseError::CheckMismatch)));
    }
    let Some(counter) = scheme.counter(id) else {
        bail!(InvalidIds(format!(
            "{id} is outside this state file's 2^{} space; it was not issued from {}",
            g.width,
            args.state[0].display()
        )));
    };
    let shard = (counter >> g.shard_bits) as u32;
    let offset = counter & (g.shard_size() - 1);
    let issued = offset < snap.marks[shard as usize];
    say!("counter  {counter}");
    say!("shard    {shard} (offset {offset}, owned by node {})", shard % g.nodes);
    say!(
        "status   {}",
        if issued { "below the shard's mark: may have been issued" } else { "above the shard's mark: never issued" }
    );
    Ok(())
}

/// `tradeid check`: one line per ID, its canonical form or why it is not
/// valid; fails (65) if any is not. `-` reads IDs from standard input.
fn check(args: CheckArgs) -> anyhow::Result<()> {
    let mut stdin_ids = Vec::new();
    if args.ids.iter().any(|a| a == "-") {
        for line in std::io::stdin().lines() {
            let line = line.context("cannot read IDs from standard input")?;
            if !line.trim().is_empty() {
                stdin_ids.push(line);
            }
        }
    }
    let mut stdin_ids = stdin_ids.into_iter();
    let (mut total, mut bad) = (0usize, 0usize);
    for arg in &args.ids {
        let ids: Vec<String> = if arg == "-" { stdin_ids.by_ref().collect() } else { vec![arg.clone()] };
        for text in ids {
            total += 1;
            match Id::parse_checked(&text) {
                Ok(id) => say!("{id}"),
                Err(e) => {
                    bad += 1;
                    say!("{:?}: {e}", text.trim());
                }
            }
        }
    }
    if bad > 0 {
        bail!(InvalidIds(format!("{bad} of {total} IDs are not valid (see the lines above)")));
    }
    Ok(())
}

/// `tradeid serve`: validate, then run the data plane under the control
/// plane until a signal.
fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let config = ServeConfig::from_args(args, control::systemd::watchdog_interval(), etcd_password())?;
    if args.check_config {
        return check_config(&config);
    }
    let server = dataplane::Server::start(&config.data)?;
    control::run(server, config.control)
}

/// `serve --check-config`: validate the state without taking its lock, so
/// this works next to a running server.
fn check_config(config: &ServeConfig) -> anyhow::Result<()> {
    let data = &config.data;
    for path in &data.state {
        match state::Snapshot::read(path) {
            Ok(snap) => {
                if let Some((node, nodes)) = data.partition {
                    snap.header.check_partition(path, node, nodes)?;
                }
                snap.header.check_servable(path)?;
            }
            Err(StateError::NotFound { .. }) if data.create => {}
            Err(e) => return Err(e.into()),
        }
    }
    say!(
        "configuration OK: {} worker(s) on {}, state {:?}, max batch {}",
        data.worker_cpus.len(),
        data.listen,
        data.state,
        data.max_batch
    );
    Ok(())
}

/// `tradeid get`: fetch IDs from running servers.
fn get(args: GetArgs) -> anyhow::Result<()> {
    if args.count == 0 {
        bail!(ConfigError("-n/--count 0 asks for no ID; give the number of IDs to fetch (1 or more)".into()));
    }
    if args.attempts == 0 {
        bail!(ConfigError("--attempts 0 would never send a request; use 1 or more attempts per server".into()));
    }
    if !(1..=MAX_BATCH_LIMIT).contains(&args.max_batch) {
        bail!(ConfigError(format!(
            "--max-batch {} is out of range; use 1..={MAX_BATCH_LIMIT} (the client halves it if a server allows less)",
            args.max_batch
        )));
    }
    if args.timeout_ms == 0 {
        bail!(ConfigError(
            "--timeout-ms 0 gives up before any reply can arrive; use a few milliseconds or more".into()
        ));
    }
    let mut servers = Vec::new();
    for s in &args.servers {
        let addr = s
            .to_socket_addrs()
            .map_err(|e| ConfigError(format!("--server {s:?} is not HOST:PORT: {e}")))?
            .next()
            .ok_or_else(|| ConfigError(format!("--server {s:?} resolves to no address")))?;
        servers.push(addr);
    }
    let config = ClientConfig {
        timeout: Duration::from_millis(args.timeout_ms),
        attempts: args.attempts,
        max_batch: args.max_batch,
        ..ClientConfig::new(servers)
    };
    let mut client = Client::new(config)?;
    let ids = client.get(args.count).map_err(|e| match e {
        ClientError::Exhausted => anyhow::Error::new(Exhausted),
        ClientError::Timeout { .. } => anyhow::Error::new(Unreachable(e.to_string())),
        e => anyhow::Error::new(e),
    })?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for id in ids {
        writeln!(out, "{id}").context(STDOUT)?;
    }
    out.flush().context(STDOUT)?;
    Ok(())
}

/// `init --etcd URLS --cluster NAME`: create the cluster unless it exists
/// (one txn, so concurrent first inits end with one cluster), then this
/// node's state file bound to it.
fn init_cluster_node(args: &InitArgs, options: &cluster::Options) -> anyhow::Result<()> {
    if args.key_file.is_some() || args.sequential || args.nodes != 1 || args.node != 0 {
        bail!(ConfigError(
            "--etcd cannot go with --key-file, --sequential, --node or --nodes: the cluster holds the key, and any \
             node may draw from any shard"
                .into()
        ));
    }
    for path in &args.state {
        if path.exists() {
            return Err(StateError::Exists { path: path.clone() }.into());
        }
    }
    let width = args.width.unwrap_or(default_width(args.check_char));
    let shard_bits = args.shard_bits.unwrap_or(Geometry::DEFAULT.shard_bits);
    let etcd = Etcd::connect(options)?;
    if etcd.meta()?.is_none() {
        check_char_width(args.check_char, width)?;
        Geometry { width, shard_bits, node: 0, nodes: 1 }
            .validate()
            .map_err(|e| ConfigError(format!("invalid --width/--shard-bits: {e}")))?;
    }
    let (meta, created) = etcd.create_or_join(width, shard_bits, args.check_char)?;
    if !created && args.check_char && !meta.check_char {
        bail!(ConfigError(format!(
            "--check-char, but cluster {:?} already exists without check characters; every node of a cluster \
             makes IDs of one format. Leave --check-char out to join it, or create a new cluster under another name",
            options.name
        )));
    }
    if !created
        && (args.width.is_some_and(|w| w != meta.width) || args.shard_bits.is_some_and(|b| b != meta.shard_bits))
    {
        bail!(ConfigError(format!(
            "cluster {:?} already exists with 2^{} IDs in shards of 2^{}; leave out --width/--shard-bits to join it",
            options.name, meta.width, meta.shard_bits
        )));
    }
    let binding = ClusterBinding::new(meta.cluster_id, &options.name).map_err(ConfigError)?;
    let header = Header::for_cluster(meta.width, meta.shard_bits, meta.key, meta.check_char, binding)
        .context("cannot read the OS random source")?;
    state::create(&args.state, &header)?;
    for path in &args.state {
        say!("created {}", path.display());
    }
    say!(
        "{} cluster {:?} (id {:016x}, space {}) in etcd at {}: 2^{} IDs in {} shards of {}{}",
        if created { "created" } else { "joined" },
        options.name,
        meta.cluster_id,
        header.space_id(),
        etcd.endpoints(),
        meta.width,
        meta.shard_count(),
        meta.shard_size(),
        if meta.check_char { ", each ending in a check character" } else { "" }
    );
    Ok(())
}

/// `inspect --etcd URLS --cluster NAME`: the cluster-wide view.
fn inspect_cluster(options: &cluster::Options) -> anyhow::Result<()> {
    let etcd = Etcd::connect(options)?;
    let meta = etcd.meta()?.ok_or_else(|| {
        ConfigError(format!(
            "cluster {:?} does not exist in etcd at {} (no {}); create it with `tradeid init --state FILE --etcd {} --cluster {}`",
            options.name,
            etcd.endpoints(),
            etcd.key("meta"),
            etcd.endpoints(),
            options.name
        ))
    })?;
    let marks = etcd.marks(meta.shard_count())?;
    let claims = etcd.claims()?;
    let nodes = etcd.nodes()?;
    let capacity = u64::from(meta.shard_count()) * meta.shard_size();
    // (A mark past its shard's end, from a hand-edited key, counts as full.)
    let used: u64 = marks.iter().map(|&m| m.min(meta.shard_size())).sum();
    let full = marks.iter().filter(|&&m| m >= meta.shard_size()).count();
    let partly = marks.iter().filter(|&&m| m > 0 && m < meta.shard_size()).count();
    let pct = |n: u64| 100.0 * n as f64 / capacity as f64;
    say!("cluster        {} (id {:016x}) in etcd at {}", options.name, meta.cluster_id, etcd.endpoints());
    say!("created        unix time {}", meta.created_unix);
    say!("geometry       2^{} IDs, {} shards of {}", meta.width, meta.shard_count(), meta.shard_size());
    say!(
        "ids            {}",
        if meta.check_char { "6 characters and a check character" } else { "7 characters, no check character" }
    );
    say!("reserved       {used} of {capacity} ({:.4}%)", pct(used));
    say!("served         counted by each node: `tradeid inspect --state FILE` there, or tradeid_ids_served_total");
    say!("remaining      {} ({:.4}%)", capacity - used, pct(capacity - used));
    say!("shards         {partly} partly used, {full} full");
    say!("live nodes     {}", nodes.len());
    for (node, info) in &nodes {
        let held: Vec<String> = claims.iter().filter(|(_, n)| *n == node).map(|(s, _)| s.to_string()).collect();
        let shards = if held.is_empty() { "none".to_string() } else { held.join(", ") };
        say!("  node {node}: {info}");
        say!("    shards claimed: {shards}");
    }
    let orphans: Vec<String> =
        claims.iter().filter(|(_, n)| !nodes.contains_key(*n)).map(|(s, n)| format!("{s} ({n})")).collect();
    if !orphans.is_empty() {
        say!("claims of nodes no longer registered (they expire with their lease): {}", orphans.join(", "));
    }
    Ok(())
}

/// `raise-marks --state FILE --etcd URLS --cluster NAME`: after etcd was
/// restored from a backup (or lost its data), raise every shard mark in
/// etcd that is below this stopped node's state file, so that no node
/// reissues what this one handed out; if etcd lost the cluster's metadata
/// too, write it again from the file (which holds the cluster's id, key and
/// geometry). Marks only rise: running it twice, or for a node that was
/// never behind, changes nothing. Serves nothing.
fn raise_marks(args: RaiseMarksArgs) -> anyhow::Result<()> {
    let Some(options) = cluster_options(&args.etcd, etcd_password())? else {
        bail!(ConfigError("raise-marks needs --etcd URLS and --cluster NAME: the cluster whose marks to raise".into()));
    };
    // Locked like `serve`: a node that still serves could reserve below the
    // marks while they are being raised, so it must be stopped first.
    let (store, _report) = Store::open(&args.state).context("raise-marks works on a stopped node's state file")?;
    let path = store.path().display().to_string();
    let (Some(binding), Some(file_meta)) = (store.header().cluster, cluster::Meta::of_file(store.header())) else {
        bail!(ConfigError(format!(
            "state file {path} is not a cluster node's (it was not made with `tradeid init --etcd`); it has no marks in etcd to raise"
        )));
    };
    if binding.name() != options.name {
        bail!(ConfigError(format!(
            "state file {path} belongs to cluster {:?}, not {:?} (--cluster)",
            binding.name(),
            options.name
        )));
    }
    let etcd = Etcd::connect(&options)?;
    let meta = match etcd.meta()? {
        Some(meta) => meta,
        None => {
            let meta = etcd.write_meta_if_absent(&file_meta)?.context("the cluster metadata vanished while written")?;
            if meta.same_space(&file_meta) {
                say!("the cluster's metadata {} was missing from etcd; wrote it again from {path}", etcd.key("meta"));
            }
            meta
        }
    };
    if !meta.same_space(&file_meta) {
        bail!(ConfigError(format!(
            "state file {path} was made for cluster {:?} with id {:016x}, but the cluster of that name in etcd at {} has id {:016x} (or another key or geometry): it is another ID space, whose marks this file says nothing about",
            options.name,
            file_meta.cluster_id,
            etcd.endpoints(),
            meta.cluster_id
        )));
    }
    let marks = etcd.marks(meta.shard_count())?;
    let mut raised = 0;
    for (shard, etcd_mark) in (0..meta.shard_count()).zip(marks) {
        let local = store.mark(shard);
        if etcd_mark < local {
            raised += u32::from(etcd.raise_mark(shard, etcd_mark, local)?.1);
        }
    }
    say!(
        "cluster {:?} (id {:016x}) in etcd at {}: raised {raised} of {} shard marks to state file {path}'s; the others were at or above it already",
        options.name,
        meta.cluster_id,
        etcd.endpoints(),
        meta.shard_count()
    );
    Ok(())
}
