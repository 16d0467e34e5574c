//! Tests that only PostgreSQL can have: the schema a connection URL selects.

use super::support::{self, TestDb};

/// The store's connections use the schema the URL's `options=-csearch_path%3D…` names: its
/// tables are created there, not in `public`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_options_select_the_schema() {
    let Some(db) = TestDb::postgres("url_options_select_the_schema").await else {
        return;
    };
    let schema = db.schema().unwrap().to_owned();
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&support::pg_server_url())
        .await
        .unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY table_name",
    )
    .bind(&schema)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    for t in ["_sqlx_migrations", "events", "messages", "runs"] {
        assert!(tables.iter().any(|x| x == t), "{t} in {schema}: {tables:?}");
    }
    let current = db.text_rows("SELECT current_schema()::text").await;
    assert_eq!(current, [[Some(schema)]]);
}
