//! [`ReportStore`] for [`AnyStore`]: whichever adapter the database URL chose.

use super::{
    BookReport, OffsetAdvance, PartitionOffset, ReportChange, ReportKey, ReportOrder, ReportStore,
    ReportTotals,
};
use crate::domain::BookId;
use crate::store::{AnyStore, StoreError};

/// Runs the same call on whichever adapter `self` holds.
macro_rules! delegate {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($store) => $call.await,
            AnyStore::Postgres($store) => $call.await,
        }
    };
}

impl ReportStore for AnyStore {
    async fn apply_batch(
        &self,
        group: &str,
        topic: &str,
        changes: &[ReportChange],
        offsets: &[OffsetAdvance],
    ) -> Result<(), StoreError> {
        delegate!(self, store => store.apply_batch(group, topic, changes, offsets))
    }

    async fn stored_groups(&self) -> Result<Vec<String>, StoreError> {
        delegate!(self, store => store.stored_groups())
    }

    async fn stored_offsets(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<PartitionOffset>, StoreError> {
        delegate!(self, store => store.stored_offsets(group, topic))
    }

    async fn list_reports(&self) -> Result<Vec<BookReport>, StoreError> {
        delegate!(self, store => store.list_reports())
    }

    async fn list_reports_page(
        &self,
        after: Option<&ReportKey>,
        limit: u32,
    ) -> Result<Vec<BookReport>, StoreError> {
        delegate!(self, store => store.list_reports_page(after, limit))
    }

    async fn list_reports_sorted(
        &self,
        order: ReportOrder,
        limit: u32,
    ) -> Result<Vec<BookReport>, StoreError> {
        delegate!(self, store => store.list_reports_sorted(order, limit))
    }

    async fn report_totals(&self) -> Result<ReportTotals, StoreError> {
        delegate!(self, store => store.report_totals())
    }

    async fn report(&self, book_id: BookId) -> Result<Option<BookReport>, StoreError> {
        delegate!(self, store => store.report(book_id))
    }

    async fn reset(&self) -> Result<Vec<String>, StoreError> {
        delegate!(self, store => store.reset())
    }
}
