//! Announcements between processes (PostgreSQL); SQLite has no one to tell.

use super::*;
use herald_store::Signals;

conformance! {
    processes_hear_each_others_announcements,
}

async fn processes_hear_each_others_announcements(db: &TestDb) {
    use herald_store::Heard;
    use std::time::Duration;
    let Some(mut heard_by_first) = db.store.announcements().await.expect("listen") else {
        assert_eq!(
            db.kind,
            support::Kind::Sqlite,
            "only SQLite has no one to tell"
        );
        return;
    };
    let second = db.open_another().await;
    let mut heard_by_second = second
        .announcements()
        .await
        .expect("listen")
        .expect("PostgreSQL listens");
    let next = async |a: &mut herald_store::Announcements| {
        tokio::time::timeout(Duration::from_secs(5), a.next())
            .await
            .ok()
            .map(|h| h.expect("listening"))
    };

    second.announce(Signals::MESSAGES);
    second.announce(Signals::WORKFLOWS);
    let mut got = Signals::default();
    while !(got.contains(Signals::MESSAGES) && got.contains(Signals::WORKFLOWS)) {
        match next(&mut heard_by_first).await {
            Some(Heard::Signals(s)) => got = got | s,
            other => panic!("expected the second store's announcement, got {other:?}"),
        }
    }
    assert!(!got.contains(Signals::EVENTS), "{got:?}");

    // Stored events are announced by the store itself; a process does not hear its own.
    accept(&db.store, vec![contact_event("evt_announced", "c1", T0)]).await;
    assert_eq!(
        next(&mut heard_by_second).await,
        Some(Heard::Signals(Signals::EVENTS))
    );
    assert_eq!(
        tokio::time::timeout(Duration::from_millis(300), heard_by_first.next())
            .await
            .ok()
            .map(|h| h.expect("listening")),
        None,
        "a store hears only the others"
    );
}
