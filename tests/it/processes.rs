//! The binaries as processes: a port in use is named with the setting to change.

use std::process::Command;

#[test]
fn a_port_in_use_names_the_address_and_the_setting_to_change() {
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let cases = [
        (env!("CARGO_BIN_EXE_bloom-api"), "BLOOM_RUNTIME_PORT"),
        (env!("CARGO_BIN_EXE_bloom-reconciler"), "BLOOM_RECONCILER_HTTP_PORT"),
        (env!("CARGO_BIN_EXE_bloom-worker"), "BLOOM_WORKER_HTTP_PORT"),
    ];
    for (bin, variable) in cases {
        let out = Command::new(bin)
            .env(variable, &port)
            .env("BLOOM_RUNTIME_HOST", "0.0.0.0")
            // Unreachable: the port must be refused before anything is connected.
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
            .env("NATS_URL", "nats://127.0.0.1:1")
            .env_remove("RUST_LOG")
            .output()
            .expect("run binary");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bin}: {err}");
        assert!(err.contains(&format!("cannot listen on 0.0.0.0:{port}")), "{bin}: {err}");
        assert!(err.contains(variable) && err.to_lowercase().contains("address already in use"), "{bin}: {err}");
        assert!(!err.contains('\x1b'), "{bin}: no colour codes when stderr is not a terminal: {err:?}");
    }
}
