//! `/healthz`, and the promise that nothing a client sends can crash the process or leave it
//! unhealthy.

use crate::helpers::*;
use serde_json::{Value, json};

both_backends!(
    healthz_answers_ok,
    hostile_requests_leave_the_server_healthy
);

async fn healthz_answers_ok(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    let response = app.get("/healthz").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"status": "ok", "loops": {"dispatcher": "ok", "stepper": "ok", "deliverer": "ok", "scheduler": "ok"}})
    );
    assert_eq!(app.get("/no/such/route").await.status(), 404);
    // Listing events set aside is the admin API's: no token, no listing.
    assert_eq!(app.get("/v1/events?status=dead").await.status(), 401);
}

async fn hostile_requests_leave_the_server_healthy(backend: Backend) {
    let Some(app) = spawn_app(TestOptions::new(backend)).await else {
        return;
    };
    let mut bodies: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0u8; 4096],
        (0..=255u8).cycle().take(100_000).collect(),
        b"{\"specversion\": \"1.0\", \"id\": \"\\ud800\"}".to_vec(),
        format!("{}{}", "{\"a\":".repeat(50_000), "}".repeat(50_000)).into_bytes(),
        serde_json::to_vec(&json!([null, 1, "x", [], {}])).unwrap(),
    ];
    // Valid JSON with hostile values: huge ids, nulls, unicode, nested garbage in data.
    let mut ev = new_signup(contact("c_hostile", "Ann"));
    ev["id"] = json!("x".repeat(100_000));
    bodies.push(serde_json::to_vec(&ev).unwrap());
    let mut ev = new_signup(contact("c_hostile", "Ann"));
    ev["data"]["contact"]["id"] = json!("");
    bodies.push(serde_json::to_vec(&ev).unwrap());
    let mut ev = new_signup(contact("c_hostile", "Ann"));
    ev["data"]["offer"] = json!({"id": "o", "product_ids": [1, 2, 3]});
    bodies.push(serde_json::to_vec(&ev).unwrap());

    for body in bodies {
        for ct in [CLOUDEVENT, CLOUDEVENT_BATCH, "text/plain"] {
            let status = app.post_signed(body.clone(), ct).await.status().as_u16();
            assert!(
                (400..500).contains(&status),
                "hostile body answered {status}"
            );
            let status = app
                .post_raw(body.clone(), &[("content-type", ct.to_owned())])
                .await
                .status()
                .as_u16();
            assert_eq!(status, 401);
        }
    }
    // Many concurrent refusals at once.
    let garbage = app.post_signed(b"][".to_vec(), CLOUDEVENT);
    let _ = garbage.await;
    let posts =
        (0..50).map(|i| app.post_signed(format!("{{\"broken\": {i}").into_bytes(), CLOUDEVENT));
    for response in futures::future::join_all(posts).await {
        assert_eq!(response.status(), 400);
    }
    app.settle().await;
    assert!(
        app.store
            .contact("c_hostile".into())
            .await
            .unwrap()
            .is_none()
    );
    app.assert_healthy().await;
}
