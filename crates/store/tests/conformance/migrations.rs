//! Migrations: both backends apply theirs, again without change, with the same numbers.

use super::*;
use std::collections::BTreeSet;

conformance! {
    migrations_apply_and_reapply,
}

async fn migrations_apply_and_reapply(db: &TestDb) {
    // Once by connect; again explicitly, and again by a second store: harmless.
    db.store
        .backend()
        .migrate()
        .await
        .expect("migrating again is harmless");
    let second = db.open_another().await;
    second.ping().await.expect("ping");
    db.store.ping().await.expect("ping");

    let applied = strings(
        // Qualified: PostgreSQL would order by the output column, the text, putting 10 before 2.
        db.text_rows(
            "SELECT CAST(version AS TEXT) FROM _sqlx_migrations ORDER BY _sqlx_migrations.version",
        )
        .await,
    );
    let expected: Vec<Vec<String>> = migration_numbers(db.kind)
        .into_iter()
        .map(|n| vec![n.trim_start_matches('0').to_owned()])
        .collect();
    assert_eq!(applied, expected, "each migration applied exactly once");
    assert_eq!(db.store.undispatched_count().await.unwrap(), 0);
}

fn migration_numbers(kind: support::Kind) -> Vec<String> {
    let folder = match kind {
        support::Kind::Sqlite => "sqlite",
        support::Kind::Postgres => "postgres",
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../migrations")
        .join(folder);
    let mut numbers: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".sql"))
        .map(|name| name.split('_').next().unwrap().to_owned())
        .collect();
    numbers.sort();
    numbers
}

#[test]
fn both_backends_have_the_same_migration_numbers() {
    let sqlite = migration_numbers(support::Kind::Sqlite);
    let postgres = migration_numbers(support::Kind::Postgres);
    assert!(!sqlite.is_empty());
    assert_eq!(
        sqlite, postgres,
        "migrations/sqlite and migrations/postgres must list the same numbers"
    );
    let unique: BTreeSet<&String> = sqlite.iter().collect();
    assert_eq!(
        unique.len(),
        sqlite.len(),
        "no migration number is used twice"
    );
}
