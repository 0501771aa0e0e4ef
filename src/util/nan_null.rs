//! JSON has no NaN: serde_json writes a non-finite f64 as `null`. Numbers that are NaN by design
//! (a train log's dev loss between evaluations, a margin without controls) must still read
//! back, so stored cells resume and merge: `null` reads as NaN (±inf, which no stored number
//! is meant to be, would read back as NaN too). Use with `#[serde(deserialize_with = ...)]`.
use serde::{Deserialize, Deserializer};

pub fn f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// `[(name, value)]` lists (a cell's control IIAs).
pub fn pairs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, f64)>, D::Error> {
    Ok(Vec::<(String, Option<f64>)>::deserialize(d)?.into_iter().map(|(k, v)| (k, v.unwrap_or(f64::NAN))).collect())
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Row {
        #[serde(deserialize_with = "super::f64")]
        x: f64,
        #[serde(deserialize_with = "super::pairs")]
        c: Vec<(String, f64)>,
    }

    #[test]
    fn nan_survives_a_json_round_trip() {
        let text = serde_json::to_string(&Row { x: f64::NAN, c: vec![("a".into(), f64::NAN), ("b".into(), 0.5)] }).unwrap();
        assert_eq!(text, r#"{"x":null,"c":[["a",null],["b",0.5]]}"#);
        let r: Row = serde_json::from_str(&text).unwrap();
        assert!(r.x.is_nan() && r.c[0].1.is_nan() && r.c[1].1 == 0.5);
        let r: Row = serde_json::from_str(r#"{"x":1.5,"c":[]}"#).unwrap();
        assert_eq!(r.x, 1.5);
    }
}
