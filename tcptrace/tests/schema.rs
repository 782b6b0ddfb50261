//! The NDJSON contract without root: a committed sample with every event
//! kind, every cause and both kinds of stats records validates against the
//! committed schema, and reads back into the model unchanged.
use std::collections::BTreeSet;

use serde_json::Value;
use tcptrace::model::{Cause, EventKind, Record};

const SCHEMA: &str = include_str!("../schema/tcptrace.schema.json");
const SAMPLE: &str = include_str!("fixtures/records.ndjson");

#[test]
fn every_record_type_in_the_sample_matches_the_schema_and_the_model() {
    let schema: Value = serde_json::from_str(SCHEMA).expect("the schema is JSON");
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("the schema compiles");
    let (mut kinds, mut causes, mut finals) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for (n, line) in SAMPLE.lines().enumerate() {
        let value: Value = serde_json::from_str(line).expect("each line is JSON");
        if let Err(e) = validator.validate(&value) {
            panic!("line {}: violates the schema: {e}\n{line}", n + 1);
        }
        let record: Record = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("line {}: not a record: {e}\n{line}", n + 1));
        let again = serde_json::to_value(&record).expect("serializes");
        assert_eq!(again, value, "line {} changed on the way back", n + 1);
        match record {
            Record::Event(e) => kinds.insert(e.kind.as_str()),
            Record::Verdict(v) => causes.insert(v.cause.as_str()),
            Record::Stats(s) => finals.insert(s.r#final),
        };
    }
    let all_kinds: BTreeSet<&str> = EventKind::all().map(EventKind::as_str).collect();
    let all_causes: BTreeSet<&str> = Cause::all().map(Cause::as_str).collect();
    assert_eq!(kinds, all_kinds, "the sample has every event kind");
    assert_eq!(causes, all_causes, "the sample has every cause");
    assert_eq!(
        finals,
        BTreeSet::from([false, true]),
        "periodic and final stats"
    );
}

#[test]
fn the_schema_lists_exactly_the_model_s_kinds_causes_and_states() {
    let schema: Value = serde_json::from_str(SCHEMA).expect("the schema is JSON");
    let names = |path: &str| -> BTreeSet<String> {
        schema
            .pointer(path)
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("no enum at {path}"))
            .iter()
            .map(|v| v.as_str().expect("enum of strings").to_string())
            .collect()
    };
    let kinds = EventKind::all().map(|k| k.as_str().to_string());
    assert_eq!(names("/$defs/event/properties/kind/enum"), kinds.collect());
    let causes = Cause::all().map(|c| c.as_str().to_string());
    assert_eq!(
        names("/$defs/verdict/properties/cause/enum"),
        causes.collect()
    );
    let states = <tcptrace::model::TcpState as strum::IntoEnumIterator>::iter()
        .map(|s| s.as_str().to_string());
    assert_eq!(names("/$defs/tcp_state/enum"), states.collect());
}
