//! Nothing stops the queues: an event the database rejects and items whose processing panics are
//! set aside as dead while everything behind them goes on; a loop that stops making progress is
//! named by `/healthz`, and health comes back when it resumes.

use super::*;
use herald_engine::Stage;
use herald_store::RunState;
use std::sync::Arc;

both_backends!(
    a_poisoned_event_is_set_aside_and_the_queue_goes_on,
    healthz_reports_a_stopped_loop,
);

/// One email on `new_signup`.
fn signup_email() -> String {
    one_email_workflow("new_signup", "Welcome", false)
}

/// Posts the contacts' signups as the platform would: half in one batch, half one at a time.
async fn post_half_batch_half_single(app: &TestApp, events: &[Value]) {
    let (batch, singles) = events.split_at(events.len() / 2);
    assert_eq!(app.accept_batch(batch).await, vec!["new"; batch.len()]);
    for event in singles {
        assert_eq!(app.accept(event).await, "new");
    }
}

/// The items `GET path` lists under `key` (`events`, `runs`, `messages`), once it lists at
/// least one; fails the test naming the path if none is listed within [`WAIT`].
async fn listed_dead(app: &TestApp, path: &str, key: &str) -> Vec<Value> {
    let mut last = Value::Null;
    let listed = eventually(async || {
        let (status, body) = app.admin_get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        let some = body[key].as_array().is_some_and(|items| !items.is_empty());
        last = body;
        some
    })
    .await;
    assert!(
        listed,
        "GET {path} listed nothing within {WAIT:?}: {last}\nmessages: {:?}\nruns: {:?}",
        status_counts(&app.messages().await),
        run_states(&app.runs().await)
    );
    last[key].as_array().cloned().unwrap_or_default()
}

/// The events `GET /v1/events?status=dead` lists, once there is one.
async fn dead_events(app: &TestApp) -> Vec<Value> {
    listed_dead(app, "/v1/events?status=dead", "events").await
}

/// Asserts the one dead event is `event`, its error containing `error_part`.
fn assert_listed_dead(dead: &[Value], event: &Value, error_part: &str) {
    let contact_id = &event["data"]["contact"]["id"];
    assert_eq!(
        dead.len(),
        1,
        "expected exactly the event of {contact_id} listed dead: {dead:#?}"
    );
    let listed = &dead[0];
    for field in ["source", "id"] {
        assert_eq!(
            listed[field], event[field],
            "the dead event's {field}: {listed}"
        );
    }
    assert_eq!(
        listed["type"], event["type"],
        "the type as posted: {listed}"
    );
    assert_eq!(&listed["contact_id"], contact_id, "{listed}");
    assert_eq!(listed["status"], "dead", "{listed}");
    let error = listed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(error_part),
        "the dead event's error should say {error_part:?}: {listed}"
    );
}

/// Makes the database refuse any insert or update of the contact row `poison`, as a constraint
/// or a value it cannot store would. Created in the test's own database (SQLite file or
/// PostgreSQL schema) through a connection of its own.
async fn poison_contacts(app: &TestApp) {
    use sqlx::Connection;
    let url = &app.env.database_url;
    match app.env.backend {
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(url)
                .await
                .expect("connect to the test's SQLite file");
            for op in ["INSERT", "UPDATE"] {
                let sql = format!(
                    "CREATE TRIGGER poison_{op} BEFORE {op} ON contacts WHEN NEW.id = 'poison' \
                     BEGIN SELECT RAISE(ABORT, 'poisoned row refused'); END"
                );
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await
                    .expect("create the SQLite trigger");
            }
        }
        Backend::Postgres => {
            // The URL selects the test's schema (search_path), so both land there.
            let mut conn = sqlx::PgConnection::connect(url)
                .await
                .expect("connect to the test's PostgreSQL schema");
            sqlx::raw_sql(
                "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN IF NEW.id = 'poison' THEN RAISE EXCEPTION 'poisoned row refused'; END IF;
                 RETURN NEW; END $$;
                 CREATE TRIGGER poison BEFORE INSERT OR UPDATE ON contacts
                 FOR EACH ROW EXECUTE FUNCTION poison();",
            )
            .execute(&mut conn)
            .await
            .expect("create the PostgreSQL trigger");
        }
    }
}

async fn a_poisoned_event_is_set_aside_and_the_queue_goes_on(backend: Backend) {
    let options = TestOptions::new(backend)
        .workflow("signup", &signup_email())
        .admin_token(ADMIN_TOKEN);
    let Some(app) = spawn_app(options).await else {
        return;
    };
    poison_contacts(&app).await;
    let poison = new_signup(contact("poison", "Eve"));
    assert_eq!(app.accept(&poison).await, "new");
    let after = signups("after_", 100);
    post_half_batch_half_single(&app, &after).await;

    app.wait_for_mails(after.len()).await;
    app.settle().await;
    assert_one_email_each(&app.sink().received(), &addresses(&after));
    let poison_runs = app.runs_of("poison").await;
    assert!(
        poison_runs.is_empty(),
        "the rejected contact got runs: {:?}",
        run_states(&poison_runs)
    );
    assert_listed_dead(&dead_events(&app).await, &poison, "poisoned row refused");
    let dead = dead_total(&app, "events").await;
    assert!(
        dead >= 1.0,
        "herald_dead_total{{queue=\"events\"}} is {dead} after an event was set aside"
    );
    assert_health_ok(&app, "after an event was set aside").await;
}

/// Which item the fault hook makes panic.
const BOOM: &str = "boom";

/// Options whose fault hook panics for contact `boom` at `stage`.
fn panicking_at(backend: Backend, stage: Stage) -> TestOptions {
    let hook: herald_engine::FaultHook = Arc::new(move |at, contact_id| {
        if at == stage && contact_id == BOOM {
            panic!("injected fault at {at:?} for {contact_id}");
        }
    });
    TestOptions::new(backend)
        .fault_hook(hook)
        .admin_token(ADMIN_TOKEN)
}

/// Posts `boom`, then 20 good contacts; asserts each good contact gets exactly one email and
/// `boom` none; returns boom's event.
async fn boom_then_twenty_good(app: &TestApp) -> Value {
    let boom = new_signup(contact(BOOM, "Eve"));
    assert_eq!(app.accept(&boom).await, "new");
    let good = signups("good_", 20);
    post_half_batch_half_single(app, &good).await;
    app.wait_for_mails(good.len()).await;
    app.settle().await;
    assert_one_email_each(&app.sink().received(), &addresses(&good));
    assert_all_sent(
        &app.messages()
            .await
            .into_iter()
            .filter(|m| m.contact_id != BOOM)
            .collect::<Vec<_>>(),
        good.len(),
    );
    boom
}

mod a_panicking_item_does_not_stop_later_runs {
    use super::*;

    both_backends!(at_dispatch, at_step, at_deliver);

    async fn at_dispatch(backend: Backend) {
        let options = panicking_at(backend, Stage::Dispatch).workflow("signup", &signup_email());
        let Some(app) = spawn_app(options).await else {
            return;
        };
        let boom = boom_then_twenty_good(&app).await;
        let boom_runs = app.runs_of(BOOM).await;
        assert!(
            boom_runs.is_empty(),
            "the event whose dispatch panics started runs: {:?}",
            run_states(&boom_runs)
        );
        assert_listed_dead(&dead_events(&app).await, &boom, "injected fault");
        let dead = dead_total(&app, "events").await;
        assert!(
            dead >= 1.0,
            "herald_dead_total{{queue=\"events\"}} is {dead}"
        );
        assert_health_ok(&app, "after a dispatch panic").await;
    }

    async fn at_step(backend: Backend) {
        let workflow = "name: Later\ntrigger:\n  event: new_signup\nsteps:\n  - wait: 1s\n  - id: later\n    send_email:\n      subject: \"Later\"\n      text: \"a second later\"\n";
        let options = panicking_at(backend, Stage::Step).workflow("later", workflow);
        let Some(app) = spawn_app(options).await else {
            return;
        };
        boom_then_twenty_good(&app).await;
        let listed = listed_dead(&app, "/v1/runs?state=dead", "runs").await;
        let listed: Vec<&Value> = listed.iter().map(|r| &r["contact_id"]).collect();
        assert_eq!(listed, [BOOM], "GET /v1/runs?state=dead lists other runs");
        let boom_runs = app.runs_of(BOOM).await;
        assert!(
            boom_runs.len() == 1
                && boom_runs[0].state == RunState::Dead
                && boom_runs[0]
                    .reason
                    .as_deref()
                    .is_some_and(|r| r.contains("injected fault")),
            "boom's run should be dead with the panic as its reason: {:?}",
            run_states(&boom_runs)
        );
        assert!(
            app.messages_of(BOOM).await.is_empty(),
            "boom's dead run queued a message"
        );
        let dead = dead_total(&app, "runs").await;
        assert!(dead >= 1.0, "herald_dead_total{{queue=\"runs\"}} is {dead}");
        assert_health_ok(&app, "after a step panic").await;
    }

    async fn at_deliver(backend: Backend) {
        let options = panicking_at(backend, Stage::Deliver).workflow("signup", &signup_email());
        let Some(app) = spawn_app(options).await else {
            return;
        };
        boom_then_twenty_good(&app).await;
        let listed = listed_dead(&app, "/v1/messages?status=dead", "messages").await;
        let listed: Vec<&Value> = listed.iter().map(|m| &m["contact_id"]).collect();
        assert_eq!(
            listed,
            [BOOM],
            "GET /v1/messages?status=dead lists other messages"
        );
        let boom_messages = app.messages_of(BOOM).await;
        assert!(
            boom_messages.len() == 1
                && boom_messages[0].status == MessageStatus::Dead
                && boom_messages[0]
                    .reason
                    .as_deref()
                    .is_some_and(|r| r.contains("injected fault")),
            "boom's message should be dead with the panic as its reason: {:?}",
            boom_messages
                .iter()
                .map(|m| (m.status.as_str(), m.attempts, m.reason.as_deref()))
                .collect::<Vec<_>>()
        );
        let dead = dead_total(&app, "messages").await;
        assert!(
            dead >= 1.0,
            "herald_dead_total{{queue=\"messages\"}} is {dead}"
        );
        assert_health_ok(&app, "after a delivery panic").await;
    }
}

async fn healthz_reports_a_stopped_loop(backend: Backend) {
    let options = TestOptions::new(backend)
        .workflow("signup", &signup_email())
        .stall_limit(Duration::from_secs(1));
    let Some(app) = spawn_app(options).await else {
        return;
    };
    assert_health_ok(&app, "at start").await;
    let loops = app.state.loops.clone();
    assert!(loops.pause("deliverer"), "no loop named deliverer to pause");
    app.accept(&new_signup(contact("held", "Ann"))).await;

    let mut last = Value::Null;
    let reported = eventually(async || {
        let (status, body) = app.health().await;
        let stalled = status == 503
            && body["status"] == "unavailable"
            && body["loops"]["deliverer"] == "stalled";
        last = serde_json::json!({"http": status, "body": body});
        stalled
    })
    .await;
    assert!(
        reported,
        "/healthz did not report the paused deliverer as stalled (503) within {WAIT:?}; last: {last}"
    );
    for name in ["dispatcher", "stepper"] {
        assert_eq!(
            last["body"]["loops"][name], "ok",
            "only the deliverer stopped, yet {name} is reported: {last}"
        );
    }
    assert_eq!(
        app.sink().count(),
        0,
        "an email went out while the deliverer was paused"
    );
    let waited = app
        .metric("herald_queue_oldest_due_seconds{queue=\"messages\"}")
        .await;
    assert!(
        waited.is_some_and(|s| s >= 1.0),
        "herald_queue_oldest_due_seconds{{queue=\"messages\"}} is {waited:?} while the held message \
         has waited past the 1 s stall limit"
    );

    assert!(
        loops.resume("deliverer"),
        "no loop named deliverer to resume"
    );
    let mails = app.wait_for_mails(1).await;
    assert_eq!(mails[0].rcpt_to, ["held@example.com"]);
    let mut last = Value::Null;
    let healthy = eventually(async || {
        let (status, body) = app.health().await;
        last = serde_json::json!({"http": status, "body": body});
        status == 200
    })
    .await;
    assert!(
        healthy,
        "/healthz did not return to 200 after the deliverer resumed; last: {last}"
    );
    assert_health_ok(&app, "after the deliverer resumed").await;
}
