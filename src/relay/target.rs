//! What a sink should hold for a phone, from the phone's state in every
//! scope: pure functions, tested with tables.
//!
//! The state of (scope, phone) is the newest of that scope's own event and
//! the organisation-wide one (staff, imports), by when the person said it.
//! A sink is opted out for a phone if any scope it follows is, since that
//! scope's opt-out began (the earliest, if several): one person, one field,
//! and a START to one Messaging Service does not undo a STOP to another.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::domain::ORGANISATION_SCOPE;
use crate::sinks::Target;
use crate::store::{Held, StateRow};

/// State rows (of many phones, as the store returns them) grouped by phone:
/// what [`target`] takes, one phone at a time.
pub fn by_phone(rows: Vec<StateRow>) -> HashMap<String, Vec<StateRow>> {
    let mut out: HashMap<String, Vec<StateRow>> = HashMap::new();
    for s in rows {
        out.entry(s.phone.clone()).or_default().push(s);
    }
    out
}

/// A scope's state once the organisation-wide event is taken into account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Effective {
    pub scope: String,
    pub opted_out: bool,
    /// When the current value began.
    pub since: DateTime<Utc>,
    /// When the person said what decides it.
    pub said_at: DateTime<Utc>,
    /// Decided by an organisation-wide event newer than the scope's own.
    pub by_organisation: bool,
}

/// The effective state of every scope of `states` (one phone's rows) that
/// `scopes` follows (`None`: all). With no row of a followed scope, the
/// organisation-wide row stands alone (it counts in every scope).
pub fn effective(states: &[StateRow], scopes: Option<&[String]>) -> Vec<Effective> {
    let org = states.iter().find(|s| s.scope == ORGANISATION_SCOPE);
    let follows = |scope: &str| scopes.is_none_or(|list| list.iter().any(|s| s == scope));
    let mut out: Vec<Effective> = states
        .iter()
        .filter(|s| s.scope != ORGANISATION_SCOPE && follows(&s.scope))
        .map(|s| {
            let newer_org = org.filter(|o| (o.said_at, o.event_id) > (s.said_at, s.event_id));
            let decided = newer_org.unwrap_or(s);
            Effective {
                scope: s.scope.clone(),
                opted_out: decided.opted_out,
                since: decided.since,
                said_at: decided.said_at,
                by_organisation: newer_org.is_some(),
            }
        })
        .collect();
    if out.is_empty() {
        if let Some(o) = org {
            out.push(Effective {
                scope: o.scope.clone(),
                opted_out: o.opted_out,
                since: o.since,
                said_at: o.said_at,
                by_organisation: true,
            });
        }
    }
    out
}

/// The target of a sink following `scopes` for the phone of `states`.
pub fn target(states: &[StateRow], scopes: Option<&[String]>) -> Target {
    effective(states, scopes)
        .iter()
        .filter(|e| e.opted_out)
        .map(|e| e.since)
        .min()
        .map_or(Target::OptedIn, |since| Target::OptedOut { since })
}

/// A target as the store keeps it.
pub fn held(target: Target) -> Held {
    match target {
        Target::OptedOut { since } => Held { opted_out: true, since: Some(since) },
        Target::OptedIn => Held { opted_out: false, since: None },
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 12, minute, 0).single().expect("valid time")
    }

    fn row(scope: &str, opted_out: bool, said: u32, since: u32, event_id: i64) -> StateRow {
        StateRow {
            scope: scope.to_owned(),
            phone: "+14155550101".to_owned(),
            opted_out,
            said_at: at(said),
            since: at(since),
            event_id,
        }
    }

    fn scopes(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn no_state_is_opted_in() {
        assert_eq!(target(&[], None), Target::OptedIn);
    }

    #[test]
    fn a_start_on_another_service_does_not_undo_a_stop() {
        let states = [row("MGa", true, 1, 1, 1), row("MGb", false, 2, 2, 2)];
        assert_eq!(target(&states, None), Target::OptedOut { since: at(1) });
        assert_eq!(target(&states, Some(&scopes(&["MGb"]))), Target::OptedIn);
        assert_eq!(target(&states, Some(&scopes(&["MGa"]))), Target::OptedOut { since: at(1) });
    }

    #[test]
    fn the_earliest_running_opt_out_is_the_since() {
        let states = [row("MGa", true, 5, 5, 2), row("MGb", true, 3, 2, 1)];
        assert_eq!(target(&states, None), Target::OptedOut { since: at(2) });
    }

    #[test]
    fn an_organisation_wide_event_counts_in_every_scope_when_newer() {
        // Staff recorded a revocation after the person's START on MGa.
        let states = [row("MGa", false, 1, 1, 1), row(ORGANISATION_SCOPE, true, 2, 2, 2)];
        assert_eq!(target(&states, Some(&scopes(&["MGa"]))), Target::OptedOut { since: at(2) });
        // A START said after the staff revocation wins in its scope.
        let states = [row("MGa", false, 3, 3, 3), row(ORGANISATION_SCOPE, true, 2, 2, 2)];
        assert_eq!(target(&states, Some(&scopes(&["MGa"]))), Target::OptedIn);
        assert_eq!(target(&states, None), Target::OptedIn);
    }

    #[test]
    fn organisation_alone_reaches_a_sink_of_other_scopes() {
        let states = [row(ORGANISATION_SCOPE, true, 2, 2, 2), row("MGz", false, 1, 1, 1)];
        assert_eq!(target(&states, Some(&scopes(&["MGa"]))), Target::OptedOut { since: at(2) });
    }

    #[test]
    fn order_is_by_when_said_then_by_arrival() {
        let states = [row("MGa", false, 4, 4, 1), row(ORGANISATION_SCOPE, true, 4, 4, 2)];
        assert!(target(&states, None).is_opted_out(), "same instant: the later arrival decides");
        let e = effective(&states, None);
        assert!(e[0].by_organisation);
    }

    #[test]
    fn held_round_trips_the_target() {
        assert_eq!(held(Target::OptedIn), Held { opted_out: false, since: None });
        assert_eq!(held(Target::OptedOut { since: at(1) }), Held { opted_out: true, since: Some(at(1)) });
    }
}
