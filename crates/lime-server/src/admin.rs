//! `lime-server admin`: what support does on the stores of a deployment, for
//! "my messages can't be decrypted" cases: look at one device on every enabled
//! curve (`device show`) and delete it (`device delete`), so that its client
//! registers again; and count what every curve's store holds (`stats`). Works on
//! the databases directly, beside running servers.

use crate::config::Settings;
use crate::startup;
use crate::store::{BundleRequest, DeviceReport, StoreLocation, StoreStats, Stores};
use anyhow::{Context, Result};
use lime_protocol::{Curve, DeviceId};
use std::io::{BufRead, Write};

/// The stores of the enabled curves, as `serve` opens them, except that a
/// SQLite file that is not there is an error (a wrong `--data-dir`), not a new
/// empty database.
async fn open_existing_stores(settings: &Settings) -> Result<Stores> {
    for curve in settings.storage.enabled_curves() {
        if let StoreLocation::Sqlite(path) = settings.storage.location(curve)? {
            anyhow::ensure!(
                path.exists(),
                "{curve}: SQLite database {} does not exist (wrong --data-dir or --config?)",
                path.display()
            );
        }
    }
    startup::open_stores(settings).await
}

/// The device id given on the command line, checked as the protocol checks it.
fn device_id(text: &str) -> Result<DeviceId> {
    DeviceId::new(text).map_err(|error| anyhow::anyhow!("not a device id {text:?}: {error}"))
}

/// `admin device show`: prints what every enabled curve's store knows about
/// `device`, with at most `recent` bundle requests each way. Fails when no store
/// has it registered, so that scripts can tell.
pub async fn device_show(settings: &Settings, device: &str, recent: u32) -> Result<()> {
    let device = device_id(device)?;
    let stores = open_existing_stores(settings).await?;
    println!("{device}");
    let mut registered = 0;
    for (curve, store) in stores.iter() {
        let report = store
            .device_report(device.clone(), recent)
            .await
            .with_context(|| format!("{curve}: cannot read the device"))?;
        match report {
            None => println!("  {curve}: not registered"),
            Some(report) => {
                registered += 1;
                print_report(curve, &report, recent);
            }
        }
    }
    anyhow::ensure!(
        registered > 0,
        "{device} is not registered on any enabled curve"
    );
    Ok(())
}

fn print_report(curve: Curve, report: &DeviceReport, recent: u32) {
    let signed_pre_key = match report.signed_pre_key_id {
        Some(id) => format!("signed pre-key id {id} (age unknown: the schema keeps no date)"),
        None => "no signed pre-key".to_owned(),
    };
    println!(
        "  {curve}: registered; {signed_pre_key}; {} one-time pre-keys",
        report.one_time_pre_keys
    );
    print_requests(
        "bundles it asked for (requests as source)",
        "of",
        &report.requests_as_source,
        recent,
    );
    print_requests(
        "its bundle served (requests as target)",
        "to",
        &report.requests_as_target,
        recent,
    );
}

fn print_requests(title: &str, preposition: &str, requests: &[BundleRequest], recent: u32) {
    if requests.is_empty() {
        println!("    {title}: none recorded");
        return;
    }
    println!("    {title}, latest {recent} at most:");
    for request in requests {
        let at = request.at.as_deref().unwrap_or("(no time)");
        println!("      {at} UTC  {preposition} {}", request.peer);
    }
}

/// `admin device delete`: deletes `device` and its one-time pre-keys from every
/// enabled curve's store where it is registered, after a yes on stdin unless
/// `confirmed`. Its client registers again the next time it starts.
pub async fn device_delete(settings: &Settings, device: &str, confirmed: bool) -> Result<()> {
    let device = device_id(device)?;
    let stores = open_existing_stores(settings).await?;
    let mut registered = Vec::new();
    for (curve, store) in stores.iter() {
        let report = store
            .device_report(device.clone(), 0)
            .await
            .with_context(|| format!("{curve}: cannot read the device"))?;
        if report.is_some() {
            registered.push((curve, store));
        }
    }
    anyhow::ensure!(
        !registered.is_empty(),
        "{device} is not registered on any enabled curve: nothing to delete"
    );
    let curves: Vec<&str> = registered.iter().map(|(curve, _)| curve.name()).collect();
    let curves = curves.join(", ");
    if !confirmed && !confirm(&format!("Delete {device} and its keys from {curves}?"))? {
        anyhow::bail!("not deleted (answer yes, or give --yes)");
    }
    for (curve, store) in registered {
        store
            .delete_device(device.clone())
            .await
            .with_context(|| format!("{curve}: cannot delete {device}"))?;
        println!("{curve}: {device} deleted");
    }
    Ok(())
}

/// Asks `question` on stderr; true when stdin answers y or yes.
fn confirm(question: &str) -> Result<bool> {
    eprint!("{question} [y/N] ");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("cannot read the answer")?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// One curve's line of `admin stats`.
#[derive(serde::Serialize)]
struct CurveStats {
    curve: &'static str,
    backend: &'static str,
    #[serde(flatten)]
    stats: StoreStats,
}

/// `admin stats`: the counts of every enabled store ([`StoreStats`]), as a table
/// or, with `json`, one JSON object. Fails when a store cannot be counted.
pub async fn stats(settings: &Settings, json: bool) -> Result<()> {
    let stores = open_existing_stores(settings).await?;
    let threshold = settings.metrics.low_stock_threshold;
    let mut curves = Vec::new();
    let mut failed = false;
    for (curve, store) in stores.iter() {
        match store.stats(threshold).await {
            Ok(stats) => curves.push(CurveStats {
                curve: curve.name(),
                backend: store.backend(),
                stats,
            }),
            Err(error) => {
                eprintln!("{curve}: {error}");
                failed = true;
            }
        }
    }
    if json {
        println!("{}", serde_json::json!({ "curves": curves }));
    } else {
        print_stats_table(&curves, threshold);
    }
    anyhow::ensure!(!failed, "some stores could not be counted");
    Ok(())
}

fn print_stats_table(curves: &[CurveStats], threshold: u32) {
    let below = format!("below_{threshold}");
    println!(
        "{:<13} {:<9} {:>9} {:>11} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} {:>6}",
        "curve",
        "backend",
        "devices",
        "opks",
        "opks:0",
        "1-9",
        "10-99",
        "100+",
        below,
        "requests",
        "schema"
    );
    for CurveStats {
        curve,
        backend,
        stats,
    } in curves
    {
        let [none, few, some, many] = stats.stock.buckets().map(|(_, devices)| devices);
        let schema = stats
            .schema_version
            .map_or_else(|| "-".to_owned(), |version| version.to_string());
        println!(
            "{curve:<13} {backend:<9} {:>9} {:>11} {none:>7} {few:>7} {some:>7} {many:>7} {:>9} {:>9} {schema:>6}",
            stats.devices,
            stats.one_time_pre_keys,
            stats.below_threshold,
            stats.bundle_request_rows
        );
    }
}
