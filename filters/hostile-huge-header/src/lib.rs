//! `hostile-huge-header` (test fixture): in the request phase, sets request
//! header `x-huge` to a 1 MiB value (`a` repeated) and appends 10,000 extra
//! headers `x-extra-0` .. `x-extra-9999` (value `v`), then continues. Writes
//! the host refuses are skipped and counted; one warning logs how many. The
//! host's header limits must keep this from reaching the upstream (or from
//! costing unbounded memory). No config.

use sluicegate_sdk::{export_filter, log, Capabilities, Filter, Request, RequestAction};

const HUGE: usize = 1 << 20;
const EXTRA: usize = 10_000;

struct HostileHugeHeader;

impl Filter for HostileHugeHeader {
    const CAPABILITIES: Capabilities = Capabilities::REQUEST;

    fn init(_config: &str) -> Result<Self, String> {
        Ok(HostileHugeHeader)
    }

    fn on_request(&mut self, req: &Request) -> RequestAction {
        let mut refused = 0usize;
        if req.set_header("x-huge", &"a".repeat(HUGE)).is_err() {
            refused += 1;
        }
        for i in 0..EXTRA {
            if req.append_header(&format!("x-extra-{i}"), "v").is_err() {
                refused += 1;
            }
        }
        if refused > 0 {
            log::warn(format!(
                "hostile-huge-header: host refused {refused} of {} header writes",
                EXTRA + 1
            ));
        }
        RequestAction::Continue
    }
}

export_filter!(HostileHugeHeader);
