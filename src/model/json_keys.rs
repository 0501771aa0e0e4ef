//! Typed reads of a HF `config.json`: a key that is absent (or `null`) gives `None` and the
//! caller's default, but a key that is present with the wrong type is an error naming it —
//! `"rope_theta": "abc"` must not quietly become 10000.
use anyhow::{bail, Result};
use serde_json::Value;

pub struct Keys<'a>(pub &'a Value);

fn present<'a>(v: &'a Value, k: &str) -> Option<&'a Value> {
    v.get(k).filter(|x| !x.is_null())
}

fn shown(x: &Value) -> String {
    let s = x.to_string();
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

impl Keys<'_> {
    /// A non-negative integer (`1e9` and `-1` are not).
    pub fn uint(&self, k: &str) -> Result<Option<usize>> {
        match present(self.0, k) {
            None => Ok(None),
            Some(x) => match x.as_u64().and_then(|n| usize::try_from(n).ok()) {
                Some(n) => Ok(Some(n)),
                None => bail!("config.json: `{k}` must be a non-negative integer, got {}", shown(x)),
            },
        }
    }
    /// A required non-negative integer.
    pub fn req_uint(&self, k: &str) -> Result<usize> {
        match self.uint(k)? {
            Some(n) => Ok(n),
            None => bail!("config.json: missing key `{k}`"),
        }
    }
    pub fn num(&self, k: &str) -> Result<Option<f64>> {
        match present(self.0, k) {
            None => Ok(None),
            Some(x) => match x.as_f64() {
                Some(f) => Ok(Some(f)),
                None => bail!("config.json: `{k}` must be a number, got {}", shown(x)),
            },
        }
    }
    pub fn flag(&self, k: &str) -> Result<Option<bool>> {
        match present(self.0, k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(x) => bail!("config.json: `{k}` must be true or false, got {}", shown(x)),
        }
    }
    pub fn text(&self, k: &str) -> Result<Option<&str>> {
        match present(self.0, k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(x) => bail!("config.json: `{k}` must be a string, got {}", shown(x)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Keys;

    #[test]
    fn absent_is_none_and_wrong_types_name_the_key() {
        let v: serde_json::Value = serde_json::from_str(r#"{"a": 3, "b": "abc", "c": null, "d": 1e9, "e": true}"#).unwrap();
        let k = Keys(&v);
        assert_eq!(k.uint("a").unwrap(), Some(3));
        assert_eq!(k.uint("c").unwrap(), None);
        assert_eq!(k.num("zz").unwrap(), None);
        assert!(k.num("b").unwrap_err().to_string().contains("`b` must be a number, got \"abc\""));
        assert!(k.uint("d").unwrap_err().to_string().contains("`d` must be a non-negative integer"));
        assert!(k.flag("a").unwrap_err().to_string().contains("`a` must be true or false"));
        assert_eq!(k.flag("e").unwrap(), Some(true));
        assert!(k.req_uint("zz").unwrap_err().to_string().contains("missing key `zz`"));
    }
}
