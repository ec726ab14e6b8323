//! Readings of this process and board from `/proc` and `/sys`; `None` where the file is
//! missing (other OSes, VMs without a thermal zone).

/// Peak resident set size of this process (VmHWM), in MB.
pub fn peak_rss_mb() -> Option<f64> {
    proc_status_mb("VmHWM:")
}

/// Resident set size now (VmRSS), in MB.
pub fn rss_mb() -> Option<f64> {
    proc_status_mb("VmRSS:")
}

fn proc_status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((kb / 1024.0 * 10.0).round() / 10.0)
}

/// The SoC temperature from the first thermal zone (a Pi's CPU), in °C, to 0.1.
pub fn cpu_temp_c() -> Option<f64> {
    let milli: f64 = std::fs::read_to_string("/sys/class/thermal/thermal_zone0/temp")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some((milli / 100.0).round() / 10.0)
}
