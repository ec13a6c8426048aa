//! Versioned schema migrations, applied at connect in one transaction under an advisory lock.
//!
//! The applied versions are rows of `harvest_schema_version` in the store's schema. A database
//! whose highest version is above the last migration this build knows was written by a newer
//! harvest and is refused ([`StoreError::NewerVersion`]) before anything is read or written.
//! Migrations are never edited once released: a change is a new file with the next number.

use tokio_postgres::Client;

use super::{ADVISORY_CLASS_MIGRATE, db_err, quote_ident};
use crate::store::{StoreError, StoreResult};

/// One migration: its version and its SQL (several statements).
struct Migration {
    version: i32,
    sql: &'static str,
}

/// Every migration, in version order (versions 1, 2, ... without gaps).
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../../../migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../../../migrations/0002_leaders.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../../../migrations/0003_cleanup_after.sql"),
    },
    Migration {
        version: 4,
        sql: include_str!("../../../migrations/0004_session_v2.sql"),
    },
    Migration {
        version: 5,
        sql: include_str!("../../../migrations/0005_context.sql"),
    },
    Migration {
        version: 6,
        sql: include_str!("../../../migrations/0006_tenant_keys.sql"),
    },
    Migration {
        version: 7,
        sql: include_str!("../../../migrations/0007_events.sql"),
    },
    Migration {
        version: 8,
        sql: include_str!("../../../migrations/0008_events_columns.sql"),
    },
    Migration {
        version: 9,
        sql: include_str!("../../../migrations/0009_events_per_statement.sql"),
    },
    Migration {
        version: 10,
        sql: include_str!("../../../migrations/0010_events_per_insert_statement.sql"),
    },
];

/// The schema version this build creates and understands.
pub(crate) fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Creates `schema` if missing and brings it to [`latest_version`]. Safe to run from many
/// processes at once: they serialize on an advisory lock keyed by the schema name, and the
/// later ones find nothing to do.
pub(crate) async fn migrate(client: &mut Client, schema: &str) -> StoreResult<()> {
    let tx = client
        .transaction()
        .await
        .map_err(db_err("starting the migration transaction"))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&ADVISORY_CLASS_MIGRATE, &schema],
    )
    .await
    .map_err(db_err("taking the migration lock"))?;

    // Checked before CREATE so that a role without CREATE on the database can use a schema an
    // administrator made for it (CREATE SCHEMA IF NOT EXISTS checks the privilege first).
    let exists = tx
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await
        .map_err(db_err("looking up the schema"))?
        .is_some();
    if !exists {
        tx.batch_execute(&format!("CREATE SCHEMA {}", quote_ident(schema)))
            .await
            .map_err(db_err(&format!("creating schema {schema:?}")))?;
    }
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS harvest_schema_version (
             version    integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(db_err("creating harvest_schema_version"))?;

    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM harvest_schema_version",
            &[],
        )
        .await
        .map_err(db_err("reading the schema version"))?
        .try_get(0)
        .map_err(db_err("reading the schema version"))?;
    let latest = latest_version();
    if current > latest {
        return Err(StoreError::NewerVersion {
            what: format!("PostgreSQL schema {schema:?}"),
            found: u32::try_from(current).unwrap_or(u32::MAX),
            supported: u32::try_from(latest).unwrap_or(0),
        });
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        tx.batch_execute(m.sql)
            .await
            .map_err(db_err(&format!("applying schema migration {}", m.version)))?;
        tx.execute(
            "INSERT INTO harvest_schema_version (version) VALUES ($1)",
            &[&m.version],
        )
        .await
        .map_err(db_err(&format!("recording schema migration {}", m.version)))?;
    }
    tx.commit()
        .await
        .map_err(db_err("committing the schema migrations"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(
                m.version,
                i as i32 + 1,
                "migration {i} has version {}",
                m.version
            );
        }
        assert!(latest_version() >= 1);
    }
}
