//! FC's `codeChecksum`: the CRC-64 of the code package as OSS computes it
//! (CRC-64/XZ: ECMA-182 polynomial, reflected, all-ones init and xor-out),
//! printed in decimal.

const POLY: u64 = 0xC96C_5795_D787_0F42; // 0x42F0E1EBA9EA3693 reflected

const TABLE: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u64;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

pub fn crc64(data: &[u8]) -> u64 {
    let mut crc = !0u64;
    for &b in data {
        crc = TABLE[((crc ^ u64::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// `codeChecksum` as FC reports it.
pub fn code_checksum(zip: &[u8]) -> String {
    crc64(zip).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_xz_check_value() {
        // The catalogued check value of CRC-64/XZ over "123456789".
        assert_eq!(crc64(b"123456789"), 0x995D_C9BB_DF19_39FA);
        assert_eq!(crc64(b""), 0);
        assert_eq!(code_checksum(b"123456789"), "11051210869376104954");
    }
}
