//! The cost of crossing the plugin boundary: the same small call on the fixture's
//! service, statically linked and loaded from its (release) `cdylib`.
//!
//! `cargo bench -p nexus-plugin --bench invoke` prints, for each, the mean time of one
//! call over many sequential calls, and the throughput of 100 concurrent callers.

#[path = "../tests/support/fixture.rs"]
mod fixture;

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_core::KindDescriptor;
use nexus_core::traits::ServiceAdapter;
use serde_json::json;

const CALLS: u32 = 20_000;

async fn sequential(s: &dyn ServiceAdapter, method: &str) -> Duration {
    let args = json!({"id": 7, "name": "small"});
    for _ in 0..1_000 {
        let _ = s.invoke(method, args.clone()).await.unwrap();
    }
    let begun = Instant::now();
    for _ in 0..CALLS {
        let _ = s.invoke(method, args.clone()).await.unwrap();
    }
    begun.elapsed() / CALLS
}

async fn health(s: &dyn ServiceAdapter) -> Duration {
    let begun = Instant::now();
    for _ in 0..CALLS {
        let _ = s.check().await.unwrap();
    }
    begun.elapsed() / CALLS
}

async fn concurrent(s: Arc<dyn ServiceAdapter>) -> Duration {
    let begun = Instant::now();
    let per_task = CALLS / 100;
    let handles: Vec<_> = (0..100)
        .map(|_| {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                for _ in 0..per_task {
                    let _ = s.invoke("echo", json!(1)).await.unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    begun.elapsed() / (per_task * 100)
}

fn main() {
    let lib = fixture::library("release");
    let catalog = fixture::catalog("release");
    let spec = json!({"greeting": "hi"});
    let foreign = catalog.services.get("fixture-service").unwrap().build(spec.clone()).unwrap();
    let native =
        KindDescriptor::<dyn ServiceAdapter>::of::<nexus_plugin_fixture::FixtureServiceKind>().build(spec).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        println!("{CALLS} calls each, host runtime: 2 worker threads; plugin: {}", lib.display());
        for (name, s) in [("static", &native), ("plugin", &foreign)] {
            let echo = sequential(&**s, "echo").await;
            let check = health(&**s).await;
            let conc = concurrent(Arc::clone(s)).await;
            println!(
                "{name:>7}: invoke(\"echo\", small JSON) {:>9.2?}/call   check() {:>9.2?}/call   100 concurrent callers {:>9.2?}/call",
                echo, check, conc
            );
        }
    });
}
