//! The load generator and the latency profile do what they say (numbers are for
//! `bkv bench` to print, not for tests to judge; these check the reports are real).

mod common;

use common::*;

fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = run(args, "");
    assert_success(&out);
    serde_json::from_slice(&out.stdout).expect("bench --json prints JSON")
}

#[test]
fn load_generator_reports_throughput_latency_errors_and_fleet_cpu() {
    let vault = Vault::start(&["--datacenters", "3"]);
    let config = vault.config();
    let report = bench_json(&[
        "bench",
        "--config",
        config.to_str().unwrap(),
        "--op",
        "mixed",
        "--users",
        "4",
        "--concurrency",
        "2",
        "--duration",
        "2s",
        "--json",
    ]);
    assert!(report["ok"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    let p50 = report["latency_ms"]["p50"].as_f64().unwrap();
    let max = report["latency_ms"]["max"].as_f64().unwrap();
    assert!(p50 > 0.0 && max >= p50, "{report}");
    assert_eq!(
        report["argon2"]["memory_kib"], 256,
        "the lowered cost is reported"
    );
    let cpu = report["cpu_by_process_s"].as_object().unwrap();
    for name in ["dc1", "dc2", "dc3", "frontend"] {
        assert!(cpu.contains_key(name), "{report}");
    }
    assert!(report["fleet_cpu_s"].as_f64().unwrap() > 0.0);
    // Every member now reports what its records cost in memory.
    let status = vault.fleet_status();
    // The leader does every operation's OPAQUE work: it is the busiest node.
    assert_eq!(report["busiest_node"]["name"], status["leader"], "{report}");
    assert!(report["busiest_node"]["cpu_ms_per_op"].as_f64().unwrap() > 0.0);
    for member in status["members"].as_array().unwrap() {
        assert!(member["records"].as_u64().unwrap() >= 4, "{status}");
        assert!(member["rss_bytes"].as_u64().unwrap() > 0, "{status}");
    }
}

#[test]
fn crypto_floor_is_measured_on_this_machine() {
    let report = bench_json(&["bench", "--floor", "--json"]);
    let floor = &report["floor"];
    assert!(
        floor["server_recover_us"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        floor["recoveries_per_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(floor["cores"].as_u64().unwrap() >= 1);
}

#[test]
fn wan_profile_delays_requests_at_least_to_the_floor() {
    let vault = Vault::start(&["--wan", "three-continents"]);
    vault.wait_for_fleet(5);
    let config = vault.config();
    let report = bench_json(&[
        "bench",
        "--config",
        config.to_str().unwrap(),
        "--op",
        "recover",
        "--users",
        "1",
        "--concurrency",
        "1",
        "--duration",
        "2s",
        "--json",
    ]);
    let floor = report["latency_floor_ms"]
        .as_f64()
        .expect("a floor for the profile");
    assert!(floor >= 200.0, "{report}");
    let fastest = report["latency_ms"]["p50"].as_f64().unwrap();
    assert!(
        fastest >= floor * 0.99,
        "a recovery cannot beat the physical floor: {report}"
    );
}
