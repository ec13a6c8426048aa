use super::*;

#[test]
fn session_id_rules() {
    assert!(SessionId::parse("ry37456r").is_ok());
    assert!(SessionId::parse("a.b_c:d-e").is_ok());
    assert_eq!(SessionId::parse(""), Err(SessionIdError::Empty));
    assert_eq!(
        SessionId::parse(&"x".repeat(129)),
        Err(SessionIdError::TooLong(129))
    );
    assert!(SessionId::parse(&"x".repeat(128)).is_ok());
    assert!(matches!(
        SessionId::parse("a/b"),
        Err(SessionIdError::BadChar('/', 1))
    ));
    assert!(matches!(
        SessionId::parse("a\nb"),
        Err(SessionIdError::BadChar('\n', 1))
    ));
    assert_eq!(SessionId::parse(".."), Err(SessionIdError::Dots));
    assert_eq!(SessionId::parse("a..b"), Err(SessionIdError::Dots));
    assert!(matches!(
        SessionId::parse("é"),
        Err(SessionIdError::BadChar('é', 0))
    ));
}

#[test]
fn an_options_patch_replaces_only_the_keys_it_gives() {
    let base = SessionOptions {
        session_timeout_secs: Some(60),
        max_duration_secs: Some(10),
        ..SessionOptions::default()
    };
    let patch: OptionsPatch =
        serde_json::from_str(r#"{"priority": 1, "max_duration_secs": null}"#).unwrap();
    let o = patch.apply_to(&base);
    assert_eq!(
        (o.priority, o.session_timeout_secs, o.max_duration_secs),
        (1, Some(60), None)
    );
    let err = serde_json::from_str::<OptionsPatch>(r#"{"prio": 1}"#).unwrap_err();
    assert!(err.to_string().contains("prio"), "{err}");
    assert_eq!(
        OptionsPatch::from(base.clone()).apply_to(&SessionOptions::default()),
        base
    );
}

#[test]
fn status_predicates() {
    use SessionStatus::*;
    for s in SessionStatus::ALL {
        assert_eq!(s.is_active(), !s.is_terminal());
        assert_eq!(s.as_str().parse::<SessionStatus>(), Ok(s));
    }
    assert!(Completed.is_successful() && !Failed.is_successful());
    assert!(Pending.is_active() && Running.is_active());
    assert_eq!(serde_json::to_string(&Cancelled).unwrap(), "\"CANCELLED\"");
}

#[test]
fn timestamp_json_and_binary() {
    let t = Timestamp(1_764_087_760_123);
    let j = serde_json::to_string(&t).unwrap();
    assert_eq!(j, "\"2025-11-25T16:22:40.123Z\"");
    assert_eq!(serde_json::from_str::<Timestamp>(&j).unwrap(), t);
    let b = bincode::serde::encode_to_vec(t, bincode::config::standard()).unwrap();
    let (back, _): (Timestamp, usize) =
        bincode::serde::decode_from_slice(&b, bincode::config::standard()).unwrap();
    assert_eq!(back, t);
}
