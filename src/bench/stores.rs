//! Fresh stores, one per measurement: a SQLite file in a folder of the run's own, or a
//! PostgreSQL schema of its own (`bench_<random>`, reached through `search_path`). Both are
//! removed when the run ends.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tracing::warn;
use uuid::Uuid;

use super::{BenchConfig, BenchError};
use crate::store::{AnyStore, PostgresStore, SqliteStore};

/// Which adapter a measurement runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
        })
    }
}

/// A fresh store and the URL another process can open it with.
#[derive(Debug, Clone)]
pub struct BenchStore {
    pub kind: StoreKind,
    pub store: AnyStore,
    /// `sqlite:<file>` or the PostgreSQL URL with `options=-c search_path=<schema>`.
    pub url: String,
}

/// Makes fresh stores and removes them at the end of the run.
pub struct StoreFactory {
    folder: PathBuf,
    postgres_url: String,
    admin: Option<PgPool>,
    schemas: Vec<String>,
    files: usize,
    /// Connections per PostgreSQL pool: every writer, plus the relay's and the projection's.
    pool_size: u32,
}

impl StoreFactory {
    pub async fn new(config: &BenchConfig) -> Result<Self, BenchError> {
        let parent = config.work_dir.clone().unwrap_or_else(std::env::temp_dir);
        let folder = parent.join(format!("bookstore-bench-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&folder)
            .map_err(BenchError::io(format!("creating {}", folder.display())))?;
        Ok(Self {
            folder,
            postgres_url: config.postgres_url.clone(),
            admin: None,
            schemas: vec![],
            files: 0,
            pool_size: u32::try_from(config.writers)
                .unwrap_or(u32::MAX)
                .saturating_add(6),
        })
    }

    pub async fn fresh(&mut self, kind: StoreKind) -> Result<BenchStore, BenchError> {
        match kind {
            StoreKind::Sqlite => self.fresh_sqlite().await,
            StoreKind::Postgres => self.fresh_postgres().await,
        }
    }

    async fn fresh_sqlite(&mut self) -> Result<BenchStore, BenchError> {
        self.files += 1;
        let path = self.folder.join(format!("store-{}.db", self.files));
        let url = format!("sqlite:{}", path.display());
        let store = SqliteStore::connect(&url).await?;
        Ok(BenchStore {
            kind: StoreKind::Sqlite,
            store: AnyStore::Sqlite(store),
            url,
        })
    }

    async fn fresh_postgres(&mut self) -> Result<BenchStore, BenchError> {
        let schema = format!("bench_{}", Uuid::new_v4().simple());
        let admin = self.admin().await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await?;
        self.schemas.push(schema.clone());
        let options =
            PgConnectOptions::from_str(&self.postgres_url)?.options([("search_path", &schema)]);
        let pool = PgPoolOptions::new()
            .max_connections(self.pool_size)
            .connect_with(options)
            .await?;
        let store = PostgresStore::with_pool(pool).await?;
        let separator = if self.postgres_url.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!(
            "{}{separator}options=-c%20search_path%3D{schema}",
            self.postgres_url
        );
        Ok(BenchStore {
            kind: StoreKind::Postgres,
            store: AnyStore::Postgres(store),
            url,
        })
    }

    async fn admin(&mut self) -> Result<PgPool, BenchError> {
        if let Some(admin) = &self.admin {
            return Ok(admin.clone());
        }
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.postgres_url)
            .await?;
        self.admin = Some(admin.clone());
        Ok(admin)
    }

    /// Drops the schemas and deletes the SQLite folder. Best effort: failures are logged.
    pub async fn cleanup(self) {
        if let Some(admin) = &self.admin {
            for schema in &self.schemas {
                let drop = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(admin).await {
                    warn!(%error, schema, "could not drop a bench schema");
                }
            }
            admin.close().await;
        }
        if let Err(error) = std::fs::remove_dir_all(&self.folder) {
            warn!(%error, folder = %self.folder.display(), "could not delete the bench folder");
        }
    }
}
