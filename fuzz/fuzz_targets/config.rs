//! Any text as a config file: parsing and validation never panic; a config
//! that validates builds a route table that answers any host and path.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluicegate_fuzz::config::Config;
use sluicegate_fuzz::route::RouteTable;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text, std::path::Path::new("fuzz.toml")) {
        let table = RouteTable::new(&config);
        let (host, path) = text.split_at(text.len() / 2);
        let _ = table.find(Some(host), path);
        let _ = table.find(None, "/");
        for r in &config.routes {
            if let Some(rl) = &r.rate_limit {
                let _ = rl.get_ref().key();
            }
        }
    } else if let Err(e) = Config::parse(text, std::path::Path::new("fuzz.toml")) {
        // Every error names the file.
        assert!(e.to_string().starts_with("fuzz.toml"), "{e}");
    }
});
