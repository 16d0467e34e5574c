//! `herald preview` as a marketer runs it: the path an event takes (the branch it meets), when
//! each step happens in the contact's time zone (a wait until 09:00 across the night the clocks
//! change), the messages as they would go, and the diagram with that path marked.

use std::process::Command;

const NUDGE: &str = r#"
name: Nudge
trigger:
  event: offer_access_granted
steps:
  - id: welcome
    send_email:
      subject: "Welcome {{contact.first_name}}"
      text: "Your course: <<login_url>>"
  - id: morning
    wait: {until: "09:00", timezone: contact}
  - id: has_phone
    if:
      all:
        - {field: contact.phone, exists: true}
    then:
      - id: text_them
        send_sms: {body: "Good morning {{contact.first_name}}"}
    else:
      - id: mail_them
        send_email: {subject: "Good morning", text: "Time for lesson 1"}
"#;

/// Granted on Saturday 2026-03-07 at 15:00 in New York; the clocks go forward that night.
const EVENT: &str = r#"{"specversion": "1.0", "id": "evt_1", "source": "https://school.example.com",
  "type": "course.offer_access_granted", "time": "2026-03-07T20:00:00Z",
  "data": {"contact": {"id": "c_1", "email": "ann@example.com", "first_name": "Ann",
                       "timezone": "America/New_York"},
           "offer": {"id": "o_pro", "title": "Rust Pro"}}}"#;

#[test]
fn preview_shows_the_path_its_times_and_the_marked_diagram() {
    let dir = tempfile::tempdir().unwrap();
    for folder in ["workflows", "templates"] {
        std::fs::create_dir_all(dir.path().join(folder)).unwrap();
    }
    std::fs::write(dir.path().join("workflows/nudge.yaml"), NUDGE).unwrap();
    std::fs::write(dir.path().join("event.json"), EVENT).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .current_dir(dir.path())
        .args(["preview", "nudge", "--event", "event.json", "--diagram"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .expect("run herald preview");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = |start: &str| {
        text.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting {start:?} in:\n{text}"))
    };
    assert!(line("── the path of this event").contains("America/New_York"));
    assert!(line("Sat 2026-03-07 15:00  welcome").contains("send_email"));
    // 09:00 the next morning, in the contact's zone, after the clocks went forward.
    assert!(line("Sat 2026-03-07 15:00  morning").contains("2026-03-08T13:00:00+00:00"));
    assert!(line("Sun 2026-03-08 09:00  has_phone").ends_with("else"));
    assert!(line("Sun 2026-03-08 09:00  mail_them").contains("send_email"));
    assert!(
        !text.contains("text_them  "),
        "the branch not taken is not on the path:\n{text}"
    );
    assert!(line("── step welcome: send_email").ends_with("goes Sat 2026-03-07 15:00"));
    assert!(line("── step mail_them: send_email").ends_with("goes Sun 2026-03-08 09:00"));
    // Every send step is rendered; the one off the path says so.
    assert!(line("── step text_them: send_sms").ends_with("not on this event's path"));
    assert!(text.contains("Good morning Ann"), "{text}");
    assert!(text.contains("Subject: Welcome Ann"), "{text}");
    assert!(text.contains("/l/PREVIEW-TOKEN"), "{text}");
    // The diagram marks welcome (s0), the wait (s1), the if (s2) and the else branch (s5).
    let marked = line("    class start,");
    assert_eq!(marked, "    class start,s0,s1,s2,s5,done taken", "{text}");
    assert!(text.contains("```mermaid\nflowchart TD\n"), "{text}");
}
