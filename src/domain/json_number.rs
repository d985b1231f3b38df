//! Numbers written as JavaScript writes them: a whole number has no fraction (`0`, not
//! `0.0`), so clients that read it as an integer keep working.

use serde::Serializer;

/// Largest integer a double holds exactly (`Number.MAX_SAFE_INTEGER`).
const MAX_SAFE: f64 = 9_007_199_254_740_991.0;

/// Serializes `n` as an integer when it is a whole number JavaScript holds exactly.
pub fn serialize<S: Serializer>(n: &f64, s: S) -> Result<S::Ok, S::Error> {
    if n.fract() == 0.0 && n.abs() <= MAX_SAFE {
        s.serialize_i64(*n as i64)
    } else {
        s.serialize_f64(*n)
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize)]
    struct N(#[serde(serialize_with = "super::serialize")] f64);

    #[test]
    fn whole_numbers_have_no_fraction() {
        let json = |n| serde_json::to_string(&N(n)).unwrap();
        assert_eq!(json(0.0), "0");
        assert_eq!(json(5.0), "5");
        assert_eq!(json(-2.0), "-2");
        assert_eq!(json(2.5), "2.5");
        assert_eq!(json(1e300), "1e+300");
    }
}
