//! FC 3.0's limits, in one place.

/// Memory: 128 MB to 32 GB in steps of 64 MB.
pub const MEMORY_MIN_MB: u32 = 128;
pub const MEMORY_MAX_MB: u32 = 32 * 1024;
pub const MEMORY_STEP_MB: u32 = 64;
/// vCPU: 0.05 to 16 in steps of 0.05, expressed in thousandths.
pub const CPU_MIN_MILLI: u32 = 50;
pub const CPU_MAX_MILLI: u32 = 16_000;
pub const CPU_STEP_MILLI: u32 = 50;
/// Disk: 512 MB (standard) or 10 GB (performance).
pub const DISK_SIZES_MB: [u32; 2] = [512, 10_240];
/// Timeout: 1 s to 24 h.
pub const TIMEOUT_MIN_S: u32 = 1;
pub const TIMEOUT_MAX_S: u32 = 86_400;
/// Concurrent requests per instance.
pub const CONCURRENCY_MIN: u32 = 1;
pub const CONCURRENCY_MAX: u32 = 200;
/// Payloads.
pub const SYNC_PAYLOAD_MAX: usize = 32 * 1024 * 1024;
pub const ASYNC_PAYLOAD_MAX: usize = 128 * 1024;
/// Code package: 500 MB unzipped, 100 MB zipped (base64 in the body).
pub const CODE_ZIP_MAX: usize = 100 * 1024 * 1024;
pub const CODE_UNZIPPED_MAX: u64 = 500 * 1024 * 1024;
/// Environment variables: 4 KB in total.
pub const ENV_TOTAL_MAX: usize = 4 * 1024;
/// Default custom runtime port.
pub const DEFAULT_PORT: u16 = 9000;
/// Signature validity window either side of the server's clock.
pub const SIGNATURE_SKEW_MS: u64 = 15 * 60 * 1000;

/// FC's rule tying vCPU to memory: vCPU : memory (GB) between 1:1 and 1:4.
pub fn cpu_fits_memory(cpu_milli: u32, memory_mb: u32) -> bool {
    // memory_gb / cpu between 1 and 4  <=>  cpu*1024 <= memory_mb*1000 <= 4*cpu*1024
    let mem = u64::from(memory_mb) * 1000;
    let cpu = u64::from(cpu_milli) * 1024;
    cpu <= mem && mem <= 4 * cpu
}

/// The vCPU FC assigns when a function gives only memory: memory / 2 GB,
/// rounded to a 0.05 step and kept inside the ratio rule.
pub fn default_cpu_milli(memory_mb: u32) -> u32 {
    let half = (u64::from(memory_mb) * 1000 / 2048) as u32;
    let stepped = (half / CPU_STEP_MILLI).max(1) * CPU_STEP_MILLI;
    let mut cpu = stepped.clamp(CPU_MIN_MILLI, CPU_MAX_MILLI);
    while !cpu_fits_memory(cpu, memory_mb) && cpu < CPU_MAX_MILLI {
        cpu += CPU_STEP_MILLI;
    }
    cpu
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_rule() {
        assert!(cpu_fits_memory(1000, 1024));
        assert!(cpu_fits_memory(1000, 4096));
        assert!(!cpu_fits_memory(1000, 4097));
        assert!(!cpu_fits_memory(2000, 1024));
        assert!(cpu_fits_memory(50, 128));
    }

    #[test]
    fn default_cpu_is_valid_for_every_memory_size() {
        let mut m = MEMORY_MIN_MB;
        while m <= MEMORY_MAX_MB {
            let c = default_cpu_milli(m);
            assert!(cpu_fits_memory(c, m), "memory {m} cpu {c}");
            assert_eq!(c % CPU_STEP_MILLI, 0);
            m += MEMORY_STEP_MB;
        }
        assert_eq!(default_cpu_milli(2048), 1000);
    }
}
