//! What a database snapshot records about its server, in the manifest's `meta` map.
//!
//! Keys (all strings; lists as JSON): `db.engine` (`postgresql` | `mariadb`),
//! `db.method` (`physical` | `logical`), `db.version` (the server's full version),
//! `db.major` (what picks the recovery image: `15`, `10.11`), `db.superuser` (the
//! bootstrap role, PostgreSQL), `db.databases` (`[{"name","bytes"}]`), `db.tablespaces`
//! (`[{"name","location"}]`), `db.database` (the one database of a logical dump).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Postgresql,
    Mariadb,
}

impl Engine {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgresql => "postgresql",
            Self::Mariadb => "mariadb",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "postgresql" => Some(Self::Postgresql),
            "mariadb" => Some(Self::Mariadb),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A data directory the server starts on.
    Physical,
    /// A dump stream of one database.
    Logical,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseSize {
    pub name: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    pub name: String,
    /// Empty for the built-in ones inside the data directory.
    pub location: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseMeta {
    pub engine: Engine,
    pub method: Method,
    pub version: String,
    pub major: String,
    pub superuser: Option<String>,
    pub databases: Vec<DatabaseSize>,
    pub tablespaces: Vec<Tablespace>,
    pub database: Option<String>,
}

impl DatabaseMeta {
    #[must_use]
    pub fn to_meta(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("db.engine".into(), self.engine.as_str().into());
        m.insert(
            "db.method".into(),
            match self.method {
                Method::Physical => "physical",
                Method::Logical => "logical",
            }
            .into(),
        );
        m.insert("db.version".into(), self.version.clone());
        m.insert("db.major".into(), self.major.clone());
        if let Some(s) = &self.superuser {
            m.insert("db.superuser".into(), s.clone());
        }
        m.insert(
            "db.databases".into(),
            serde_json::to_string(&self.databases).unwrap_or_default(),
        );
        if !self.tablespaces.is_empty() {
            m.insert(
                "db.tablespaces".into(),
                serde_json::to_string(&self.tablespaces).unwrap_or_default(),
            );
        }
        if let Some(d) = &self.database {
            m.insert("db.database".into(), d.clone());
        }
        m
    }

    /// The facts of a database snapshot, or `None` for any other snapshot.
    #[must_use]
    pub fn from_meta(m: &BTreeMap<String, String>) -> Option<Self> {
        let engine = Engine::parse(m.get("db.engine")?)?;
        let method = match m.get("db.method").map(String::as_str) {
            Some("logical") => Method::Logical,
            _ => Method::Physical,
        };
        Some(Self {
            engine,
            method,
            version: m.get("db.version").cloned().unwrap_or_default(),
            major: m.get("db.major").cloned().unwrap_or_default(),
            superuser: m.get("db.superuser").cloned(),
            databases: m
                .get("db.databases")
                .and_then(|j| serde_json::from_str(j).ok())
                .unwrap_or_default(),
            tablespaces: m
                .get("db.tablespaces")
                .and_then(|j| serde_json::from_str(j).ok())
                .unwrap_or_default(),
            database: m.get("db.database").cloned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips() {
        let d = DatabaseMeta {
            engine: Engine::Mariadb,
            method: Method::Logical,
            version: "10.11.19-MariaDB".into(),
            major: "10.11".into(),
            superuser: None,
            databases: vec![DatabaseSize {
                name: "shop".into(),
                bytes: 42,
            }],
            tablespaces: vec![],
            database: Some("shop".into()),
        };
        assert_eq!(DatabaseMeta::from_meta(&d.to_meta()), Some(d));
        assert_eq!(DatabaseMeta::from_meta(&BTreeMap::new()), None);
    }
}
