//! The membership projection's writes, written once for both backends: the rows
//! [`crate::projection`] computes from a batch of events (contacts, grants, offers with their
//! product lists, products), each table in a few statements, one per batch, whose SQL each backend
//! keeps in its `membership.rs`. Every write is guarded by event time, and the rows keep event
//! order: a batch has exactly the effect of its events projected one by one.

use super::distinct;
use super::sql::{Column, Param, Tx, statement, text_list};
use crate::backend::sqlite::FromSqliteRow;
use crate::{Result, projection};
use herald_core::CourseEvent;
use std::collections::HashSet;

pub(crate) async fn project(mut tx: Tx<'_>, events: &[(i64, CourseEvent)]) -> Result<()> {
    let contacts = projection::contacts(events);
    for round in tx.rounds(contacts.iter().map(|c| (c.id, c))) {
        let field = |i: usize| Column::texts(round.iter().copied(), move |c| c.fields[i]);
        let columns = [
            Column::texts(round.iter().copied(), |c| Some(c.id)),
            field(0),
            field(1),
            field(2),
            field(3),
            field(4),
            Column::texts(round.iter().copied(), |c| c.custom_fields.as_deref()),
            Column::ints(round.iter().copied(), |c| Some(c.details_ms)),
            Column::ints(round.iter().copied(), |c| Some(c.event_ms)),
            field(5),
        ];
        tx.at()
            .execute(
                statement!(membership::UPSERT_CONTACTS),
                &[Param::Rows(&columns)],
            )
            .await?;
    }

    let grants = projection::grants(events);
    for round in tx.rounds(
        grants
            .iter()
            .map(|g| ((g.contact_id, g.kind, g.item_id), g)),
    ) {
        let columns = [
            Column::texts(round.iter().copied(), |g| Some(g.contact_id)),
            Column::texts(round.iter().copied(), |g| Some(g.kind)),
            Column::texts(round.iter().copied(), |g| Some(g.item_id)),
            Column::Bools(round.iter().map(|g| g.active).collect()),
            Column::ints(round.iter().copied(), |g| Some(g.changed_ms)),
        ];
        tx.at()
            .execute(
                statement!(membership::UPSERT_GRANTS),
                &[Param::Rows(&columns)],
            )
            .await?;
    }

    let offer_lists = project_offers(tx.at(), events).await?;
    let (missing, upserts) = projection::products(events, &offer_lists);
    if !missing.is_empty() {
        let columns = [
            Column::texts(&missing, |(id, _)| Some(*id)),
            Column::ints(&missing, |(_, t)| Some(*t)),
        ];
        tx.at()
            .execute(
                statement!(membership::INSERT_MISSING_PRODUCTS),
                &[Param::Rows(&columns)],
            )
            .await?;
    }
    for round in tx.rounds(upserts.iter().map(|p| (p.id, p))) {
        let columns = [
            Column::texts(round.iter().copied(), |p| Some(p.id)),
            Column::texts(round.iter().copied(), |p| p.title),
            Column::texts(round.iter().copied(), |p| p.url),
            Column::ints(round.iter().copied(), |p| Some(p.time_ms)),
        ];
        tx.at()
            .execute(
                statement!(membership::UPSERT_PRODUCTS),
                &[Param::Rows(&columns)],
            )
            .await?;
    }
    Ok(())
}

#[derive(sqlx::FromRow, FromSqliteRow)]
struct OfferRow {
    id: String,
    title: Option<String>,
    updated_ms: i64,
}

/// Upserts the offers and replaces the product list of each offer with that of its newest event
/// carrying one (see [`projection::offer_lists`]).
async fn project_offers<'e>(
    mut tx: Tx<'_>,
    events: &'e [(i64, CourseEvent)],
) -> Result<projection::OfferLists<'e>> {
    let facts = projection::offers(events);
    let mut newer = HashSet::new();
    if !facts.is_empty() {
        // Folded here, one row per offer: a batch of events for one offer would otherwise be one
        // upsert round per event. Only the dispatcher writes offers, under its lock.
        let ids: Vec<String> = distinct(facts.iter().map(|o| o.id))
            .into_iter()
            .map(str::to_owned)
            .collect();
        let stored: Vec<OfferRow> = tx
            .at()
            .fetch_all(statement!(membership::STORED_OFFERS), &[text_list(&ids)])
            .await?;
        let stored = stored
            .into_iter()
            .map(|o| (o.id, (o.title, o.updated_ms)))
            .collect();
        let fold = projection::fold_offers(stored, &facts);
        let columns = [
            Column::texts(&fold.rows, |(id, _, _)| Some(*id)),
            Column::texts(&fold.rows, |(_, title, _)| title.as_deref()),
            Column::ints(&fold.rows, |(_, _, t)| Some(*t)),
        ];
        tx.at()
            .execute(
                statement!(membership::UPSERT_OFFERS),
                &[Param::Rows(&columns)],
            )
            .await?;
        newer = fold.newer;
    }
    let lists = projection::offer_lists(events, &newer);
    if !lists.final_list.is_empty() {
        let offers: Vec<&str> = lists.final_list.keys().copied().collect();
        tx.at()
            .execute(
                statement!(membership::DELETE_OFFER_PRODUCTS),
                &[text_list(&offers)],
            )
            .await?;
        let pairs: Vec<(&str, &str)> = lists
            .final_list
            .iter()
            .flat_map(|(offer, index)| lists.by_event[index].iter().map(move |p| (*offer, *p)))
            .collect();
        if !pairs.is_empty() {
            let columns = [
                Column::texts(&pairs, |(offer, _)| Some(*offer)),
                Column::texts(&pairs, |(_, product)| Some(*product)),
            ];
            tx.at()
                .execute(
                    statement!(membership::INSERT_OFFER_PRODUCTS),
                    &[Param::Rows(&columns)],
                )
                .await?;
        }
    }
    Ok(lists)
}
