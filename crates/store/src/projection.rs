//! The membership projection of a batch of events as rows to write, the same for every backend.
//!
//! Each backend writes these with a few statements per batch (multi-row on PostgreSQL, run once
//! per row on SQLite's writer) instead of several statements per event; the rows keep event order, and every write is guarded by event time so
//! that a late, older event never overwrites a newer fact. Pure: no I/O here.

use herald_core::CourseEvent;
use herald_core::event::EventType;
use std::collections::{HashMap, HashSet};

/// The contact details one event carries.
pub(crate) struct ContactFacts<'e> {
    pub id: &'e str,
    /// email, phone, first_name, last_name, timezone, locale.
    pub fields: [Option<&'e str>; 6],
    /// The custom fields object as JSON text.
    pub custom_fields: Option<String>,
    /// The event's time when it carries details, else `i64::MIN`: an event without details
    /// (herald's own `user_login`) must not make older details look stale.
    pub details_ms: i64,
    pub event_ms: i64,
}

/// An enrollment event herald wrote itself is no news of the contact (no details, no activity):
/// it adds no row.
pub(crate) fn contacts<'e>(events: &'e [(i64, CourseEvent)]) -> Vec<ContactFacts<'e>> {
    events
        .iter()
        .filter(|(_, e)| e.event_type != EventType::Enrollment)
        .map(|(_, e)| {
            let contact = e.object("contact").expect("validated contact");
            let field = |k: &str| contact.get(k).and_then(|v| v.as_str());
            let t = e.time.timestamp_millis();
            ContactFacts {
                id: e.contact_id(),
                fields: [
                    "email",
                    "phone",
                    "first_name",
                    "last_name",
                    "timezone",
                    "locale",
                ]
                .map(field),
                custom_fields: contact
                    .get("custom_fields")
                    .filter(|v| v.is_object())
                    .map(|v| v.to_string()),
                details_ms: if crate::carries_contact_details(contact) {
                    t
                } else {
                    i64::MIN
                },
                event_ms: t,
            }
        })
        .collect()
}

/// An offer or product grant, or its removal.
pub(crate) struct GrantFact<'e> {
    pub contact_id: &'e str,
    /// `offer` or `product`.
    pub kind: &'static str,
    pub item_id: &'e str,
    pub active: bool,
    pub changed_ms: i64,
}

pub(crate) fn grants<'e>(events: &'e [(i64, CourseEvent)]) -> Vec<GrantFact<'e>> {
    events
        .iter()
        .filter_map(|(_, e)| {
            let (kind, active) = match e.event_type {
                EventType::OfferAccessGranted => ("offer", true),
                EventType::OfferAccessRemoved => ("offer", false),
                EventType::ProductAccessGranted => ("product", true),
                EventType::ProductAccessRemoved => ("product", false),
                _ => return None,
            };
            let item_id = e.object(kind)?.get("id")?.as_str()?;
            Some(GrantFact {
                contact_id: e.contact_id(),
                kind,
                item_id,
                active,
                changed_ms: e.time.timestamp_millis(),
            })
        })
        .collect()
}

/// Contacts that lost an offer grant in this batch, once each: if they now hold no active offer,
/// their learner links are revoked and their learner sessions end (a re-grant must not bring an
/// old link back to life).
pub(crate) fn lost_an_offer(events: &[(i64, CourseEvent)]) -> Vec<&str> {
    let mut seen = HashSet::new();
    grants(events)
        .into_iter()
        .filter(|g| g.kind == "offer" && !g.active && seen.insert(g.contact_id))
        .map(|g| g.contact_id)
        .collect()
}

/// An offer as one event describes it.
pub(crate) struct OfferFact<'e> {
    /// The event's position in the batch.
    pub index: usize,
    pub id: &'e str,
    pub title: Option<&'e str>,
    pub time_ms: i64,
}

pub(crate) fn offers<'e>(events: &'e [(i64, CourseEvent)]) -> Vec<OfferFact<'e>> {
    events
        .iter()
        .enumerate()
        .filter_map(|(index, (_, e))| {
            let o = e.object("offer")?;
            Some(OfferFact {
                index,
                id: o.get("id").and_then(|v| v.as_str()).unwrap_or_default(),
                title: o.get("title").and_then(|v| v.as_str()),
                time_ms: e.time.timestamp_millis(),
            })
        })
        .collect()
}

/// The offers table after a batch, and which offer events were at least as new as their offer's
/// last update (by batch index): the events applied one by one over the stored `(title,
/// updated_ms)` of each offer. A newer event's title wins unless it has none; an older one only
/// fills a missing title.
pub(crate) struct OfferFold<'e> {
    pub newer: HashSet<usize>,
    /// `(id, title, updated_ms)`, one per offer.
    pub rows: Vec<(&'e str, Option<String>, i64)>,
}

pub(crate) fn fold_offers<'e>(
    mut stored: HashMap<String, (Option<String>, i64)>,
    facts: &[OfferFact<'e>],
) -> OfferFold<'e> {
    let mut newer = HashSet::new();
    let (mut order, mut seen) = (Vec::new(), HashSet::new());
    for o in facts {
        let title = o.title.map(str::to_owned);
        match stored.get_mut(o.id) {
            None => {
                stored.insert(o.id.to_owned(), (title, o.time_ms));
                newer.insert(o.index);
            }
            Some((old_title, updated)) => {
                if o.time_ms >= *updated {
                    newer.insert(o.index);
                    *updated = o.time_ms;
                    if title.is_some() {
                        *old_title = title;
                    }
                } else if old_title.is_none() {
                    *old_title = title;
                }
            }
        }
        if seen.insert(o.id) {
            order.push(o.id);
        }
    }
    let rows = order
        .into_iter()
        .map(|id| {
            let (title, updated) = stored.remove(id).expect("folded above");
            (id, title, updated)
        })
        .collect();
    OfferFold { newer, rows }
}

/// Given which offer events were at least as new as their offer's last update (`newer`, by
/// batch index), the product list of each such event that carries one, and per offer the event
/// whose list the offer ends with (its last newer event with a list).
pub(crate) struct OfferLists<'e> {
    pub by_event: HashMap<usize, Vec<&'e str>>,
    pub final_list: HashMap<&'e str, usize>,
}

pub(crate) fn offer_lists<'e>(
    events: &'e [(i64, CourseEvent)],
    newer: &HashSet<usize>,
) -> OfferLists<'e> {
    let mut lists = OfferLists {
        by_event: HashMap::new(),
        final_list: HashMap::new(),
    };
    for (index, (_, event)) in events.iter().enumerate() {
        if !newer.contains(&index) {
            continue;
        }
        let o = event.object("offer").expect("an offer event");
        if let Some(ids) = o.get("product_ids").and_then(|v| v.as_array()) {
            let offer_id = o.get("id").and_then(|v| v.as_str()).unwrap_or_default();
            lists
                .by_event
                .insert(index, ids.iter().filter_map(|v| v.as_str()).collect());
            lists.final_list.insert(offer_id, index);
        }
    }
    lists
}

/// A product as one event describes it.
pub(crate) struct ProductFact<'e> {
    pub id: &'e str,
    pub title: Option<&'e str>,
    pub url: Option<&'e str>,
    pub time_ms: i64,
}

/// Product writes: those named by a newer offer's list, created if unknown (id, time), and the
/// time-guarded upserts of products events describe. Per product the writes keep event order; a
/// "create if unknown" is a no-op after any earlier write of the same product, so only a first one
/// is kept, and it is written before the upserts.
pub(crate) fn products<'e>(
    events: &'e [(i64, CourseEvent)],
    offer_lists: &OfferLists<'e>,
) -> (Vec<(&'e str, i64)>, Vec<ProductFact<'e>>) {
    let mut seen = HashSet::new();
    let (mut missing, mut upserts) = (Vec::new(), Vec::new());
    for (index, (_, event)) in events.iter().enumerate() {
        let t = event.time.timestamp_millis();
        if let Some(p) = event.object("product") {
            let g = |k: &str| p.get(k).and_then(|v| v.as_str());
            let id = g("id").unwrap_or_default();
            seen.insert(id);
            upserts.push(ProductFact {
                id,
                title: g("title"),
                url: g("url"),
                time_ms: t,
            });
        }
        for pid in offer_lists.by_event.get(&index).into_iter().flatten() {
            if seen.insert(pid) {
                missing.push((*pid, t));
            }
        }
    }
    (missing, upserts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fact(
        index: usize,
        id: &'static str,
        title: Option<&'static str>,
        t: i64,
    ) -> OfferFact<'static> {
        OfferFact {
            index,
            id,
            title,
            time_ms: t,
        }
    }

    #[test]
    fn offers_fold_as_if_applied_one_by_one() {
        let stored = HashMap::from([("o1".to_owned(), (Some("Old".to_owned()), 100))]);
        let fold = fold_offers(
            stored,
            &[
                fact(0, "o1", Some("Older"), 50),   // older: keeps the stored title
                fact(1, "o2", None, 10),            // new offer, no title yet
                fact(2, "o1", None, 100),           // as new: newer, but no title to give
                fact(3, "o2", Some("Two"), 5),      // older, fills the missing title
                fact(4, "o1", Some("Newest"), 200), // newer with a title: wins
            ],
        );
        assert_eq!(fold.newer, HashSet::from([1, 2, 4]));
        assert_eq!(
            fold.rows,
            vec![
                ("o1", Some("Newest".to_owned()), 200),
                ("o2", Some("Two".to_owned()), 10),
            ]
        );
    }
}
