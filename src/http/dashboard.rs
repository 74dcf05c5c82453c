//! The marketing dashboard: the `BookReport` as one HTML page, rendered on the server.
//!
//! It works without JavaScript: sorting is a link per column header (`?sort=price&dir=desc`),
//! and the page reloads itself every few seconds through `<meta http-equiv="refresh">`, which
//! keeps the query string and so the chosen order. Every text that comes from data goes
//! through [`escape_html`]; nothing else is interpolated.
//!
//! The page is bounded, whatever the size of the read model: it shows the first
//! [`DASHBOARD_ROWS`] rows in the chosen order (sorted and cut in the database), and says so
//! when there are more; the totals are computed by the database over every book. The JSON API
//! pages through all rows.

use std::fmt::Write;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;

use super::error::ApiError;
use super::state::{HttpState, HttpStore};
use crate::projection::{BookReport, ReportColumn, ReportOrder, ReportTotals};

/// Seconds between reloads of the page.
const REFRESH_SECONDS: u32 = 5;

/// The most rows the page shows: the first ones in the chosen order.
const DASHBOARD_ROWS: u32 = 500;

/// The query string of the page; anything unknown or malformed falls back to the default
/// order rather than failing the page.
#[derive(Debug, Default, Deserialize)]
pub(super) struct PageQuery {
    sort: Option<String>,
    dir: Option<String>,
}

pub(super) async fn page<S: HttpStore>(
    State(state): State<HttpState<S>>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Response {
    let order = query
        .map(|Query(query)| SortOrder::from_query(&query))
        .unwrap_or_default();
    let store = state.store();
    let read = tokio::try_join!(
        store.list_reports_sorted(order.report_order(), DASHBOARD_ROWS),
        store.report_totals(),
    );
    match read {
        Ok((mut reports, totals)) => {
            // The database's case folding can differ from ours outside ASCII: the rows shown
            // are in exactly the order of `ReportOrder::compare`.
            order.sort(&mut reports);
            Html(render_report(&reports, &Totals::from(totals), order)).into_response()
        }
        Err(error) => {
            let error = ApiError::from(error);
            (error.status, Html(render_failure(&error.message))).into_response()
        }
    }
}

/// The columns the table shows, each sortable, in their order.
const COLUMNS: [ReportColumn; 5] = [
    ReportColumn::Title,
    ReportColumn::Author,
    ReportColumn::Price,
    ReportColumn::Isbn,
    ReportColumn::Version,
];

/// A column's name in the query string (see [`ReportOrder`] for how it compares rows: texts
/// without regard to case, books without an ISBN after those with one).
fn column_key(column: ReportColumn) -> &'static str {
    match column {
        ReportColumn::Title => "title",
        ReportColumn::Author => "author",
        ReportColumn::Price => "price",
        ReportColumn::Isbn => "isbn",
        ReportColumn::Version => "version",
    }
}

fn column_label(column: ReportColumn) -> &'static str {
    match column {
        ReportColumn::Title => "Title",
        ReportColumn::Author => "Author",
        ReportColumn::Price => "Price",
        ReportColumn::Isbn => "ISBN",
        ReportColumn::Version => "Version",
    }
}

fn column_is_numeric(column: ReportColumn) -> bool {
    matches!(column, ReportColumn::Price | ReportColumn::Version)
}

fn column_named(key: &str) -> Option<ReportColumn> {
    COLUMNS
        .into_iter()
        .find(|&column| column_key(column) == key)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Direction {
    #[default]
    Ascending,
    Descending,
}

impl Direction {
    fn key(self) -> &'static str {
        match self {
            Direction::Ascending => "asc",
            Direction::Descending => "desc",
        }
    }

    fn reversed(self) -> Direction {
        match self {
            Direction::Ascending => Direction::Descending,
            Direction::Descending => Direction::Ascending,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SortOrder {
    column: ReportColumn,
    direction: Direction,
}

impl SortOrder {
    fn from_query(query: &PageQuery) -> SortOrder {
        let column = query
            .sort
            .as_deref()
            .and_then(column_named)
            .unwrap_or_default();
        let direction = match query.dir.as_deref() {
            Some("desc") => Direction::Descending,
            _ => Direction::Ascending,
        };
        SortOrder { column, direction }
    }

    fn report_order(self) -> ReportOrder {
        ReportOrder {
            column: self.column,
            descending: self.direction == Direction::Descending,
        }
    }

    /// Sorts by the chosen column, then by title and id, so equal values keep a stable order
    /// across reloads.
    fn sort(self, reports: &mut [BookReport]) {
        let order = self.report_order();
        reports.sort_by(|a, b| order.compare(a, b));
    }

    /// Where the header of `column` leads: the same column flips the direction, another
    /// column starts ascending.
    fn link(self, column: ReportColumn) -> String {
        let direction = if column == self.column {
            self.direction.reversed()
        } else {
            Direction::Ascending
        };
        format!("?sort={}&dir={}", column_key(column), direction.key())
    }
}

/// Number of books, sum and average of their prices: of every book, not only those shown.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Totals {
    books: u64,
    sum: Decimal,
    average: Option<Decimal>,
    last_change: Option<DateTime<Utc>>,
}

impl From<ReportTotals> for Totals {
    fn from(totals: ReportTotals) -> Totals {
        let sum = totals.price_sum;
        let average = (totals.books > 0).then(|| (sum / Decimal::from(totals.books)).round_dp(2));
        Totals {
            books: totals.books,
            sum,
            average,
            last_change: totals.last_change,
        }
    }
}

/// Replaces the characters that HTML gives a meaning (`& < > " '`) by their entities, so a
/// text can go into an element or a quoted attribute as it is.
pub fn escape_html(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

const STYLE: &str = "
  :root { color-scheme: light; --line: #d8dee4; --muted: #57606a; --accent: #0b5cad; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif;
         color: #1f2328; background: #f6f8fa; }
  main { max-width: 64rem; margin: 2rem auto; padding: 0 1rem; }
  h1 { font-size: 1.5rem; margin: 0 0 1rem; }
  .totals { display: flex; gap: 1rem; margin: 0 0 1rem; padding: 0; list-style: none; }
  .totals li { background: #fff; border: 1px solid var(--line); border-radius: 6px;
               padding: .5rem .9rem; }
  .totals b { display: block; font-size: 1.25rem; font-variant-numeric: tabular-nums; }
  .totals span { color: var(--muted); font-size: .85rem; }
  table { width: 100%; border-collapse: collapse; background: #fff;
          border: 1px solid var(--line); border-radius: 6px; }
  th, td { padding: .45rem .75rem; border-bottom: 1px solid var(--line); text-align: left; }
  th { background: #f0f3f6; font-weight: 600; white-space: nowrap; }
  th a { color: var(--accent); text-decoration: none; }
  th a:hover { text-decoration: underline; }
  tbody tr:nth-child(even) { background: #fafbfc; }
  .num { text-align: right; font-variant-numeric: tabular-nums; }
  .empty { color: var(--muted); text-align: center; padding: 2rem; }
  .note { color: var(--muted); margin: 0 0 .75rem; }
  .error { background: #fff1f0; border: 1px solid #ffccc7; border-radius: 6px; padding: 1rem; }
  footer { color: var(--muted); font-size: .85rem; margin-top: .75rem; }
";

fn render_report(reports: &[BookReport], totals: &Totals, order: SortOrder) -> String {
    let mut body = String::new();
    body.push_str(&render_totals(totals));
    if totals.books > reports.len() as u64 {
        let _ = writeln!(
            body,
            "<p class=\"note\" id=\"rows-shown\">Showing the first {} of {} books in this \
             order. The JSON API (<code>/api/books</code>) pages through all of them.</p>",
            reports.len(),
            totals.books
        );
    }
    body.push_str("<table>\n<thead><tr>");
    for column in COLUMNS {
        body.push_str(&render_header(column, order));
    }
    body.push_str("</tr></thead>\n<tbody>\n");
    if reports.is_empty() {
        body.push_str("<tr><td class=\"empty\" colspan=\"5\">No books yet.</td></tr>\n");
    }
    for report in reports {
        body.push_str(&render_row(report));
    }
    body.push_str("</tbody>\n</table>\n");
    let last_change = totals.last_change.map_or_else(
        || "no change yet".to_owned(),
        |at| {
            format!(
                "last change {}",
                at.to_rfc3339_opts(SecondsFormat::Secs, true)
            )
        },
    );
    let _ = writeln!(
        body,
        "<footer>Read model of the book-fact topic; {last_change}. \
         This page reloads every {REFRESH_SECONDS} s.</footer>"
    );
    render_document(&body)
}

fn render_totals(totals: &Totals) -> String {
    let average = totals
        .average
        .map_or_else(|| "–".to_owned(), |average| format!("{average:.2}"));
    format!(
        "<ul class=\"totals\">\
         <li><span>Books</span><b id=\"total-books\">{}</b></li>\
         <li><span>Sum of prices</span><b id=\"total-price\">{:.2}</b></li>\
         <li><span>Average price</span><b id=\"average-price\">{average}</b></li>\
         </ul>\n",
        totals.books, totals.sum
    )
}

fn render_header(column: ReportColumn, order: SortOrder) -> String {
    let class = if column_is_numeric(column) {
        " class=\"num\""
    } else {
        ""
    };
    let (aria, arrow) = match (column == order.column, order.direction) {
        (false, _) => ("", ""),
        (true, Direction::Ascending) => (" aria-sort=\"ascending\"", " ▲"),
        (true, Direction::Descending) => (" aria-sort=\"descending\"", " ▼"),
    };
    format!(
        "<th scope=\"col\"{class}{aria}><a href=\"{}\">{}{arrow}</a></th>",
        escape_html(&order.link(column)),
        column_label(column)
    )
}

fn render_row(report: &BookReport) -> String {
    let isbn = report
        .isbn
        .as_deref()
        .map_or_else(|| "–".to_owned(), escape_html);
    format!(
        "<tr data-book-id=\"{}\"><td>{}</td><td>{}</td><td class=\"num\">{}</td>\
         <td>{isbn}</td><td class=\"num\">{}</td></tr>\n",
        report.book_id,
        escape_html(&report.title),
        escape_html(&report.author),
        report.price,
        report.version
    )
}

/// The page shown when the read model cannot be read; it keeps reloading, so it turns back
/// into the report once the database answers again.
fn render_failure(message: &str) -> String {
    render_document(&format!(
        "<p class=\"error\">The report cannot be read right now: {}</p>\n",
        escape_html(message)
    ))
}

fn render_document(body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\n\
         <title>Bookstore · Books</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n\
         <h1>Books</h1>\n{body}</main>\n</body>\n</html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{BookId, Price};

    fn report(title: &str, author: &str, price: &str, isbn: Option<&str>) -> BookReport {
        BookReport {
            book_id: BookId::generate(),
            title: title.into(),
            author: author.into(),
            price: price.parse().unwrap(),
            isbn: isbn.map(str::to_owned),
            version: 1,
            updated_at: DateTime::UNIX_EPOCH,
        }
    }

    fn titles(reports: &[BookReport]) -> Vec<&str> {
        reports.iter().map(|report| report.title.as_str()).collect()
    }

    fn order(sort: &str, dir: &str) -> SortOrder {
        SortOrder::from_query(&PageQuery {
            sort: Some(sort.into()),
            dir: Some(dir.into()),
        })
    }

    #[test]
    fn escaping_neutralises_markup_and_attribute_quotes() {
        assert_eq!(
            escape_html(r#"<script>alert("x" & 'y')</script>"#),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"
        );
        assert_eq!(escape_html("Goethe – Faust"), "Goethe – Faust");
    }

    #[test]
    fn rows_sort_by_the_chosen_column_and_direction() {
        let mut reports = vec![
            report("b", "Zed", "3.00", Some("2")),
            report("A", "Amy", "10.00", None),
            report("c", "Max", "1.50", Some("1")),
        ];
        order("price", "desc").sort(&mut reports);
        assert_eq!(titles(&reports), ["A", "b", "c"]);
        order("price", "asc").sort(&mut reports);
        assert_eq!(titles(&reports), ["c", "b", "A"]);
        order("author", "desc").sort(&mut reports);
        assert_eq!(titles(&reports), ["b", "c", "A"]);
        order("isbn", "asc").sort(&mut reports);
        assert_eq!(titles(&reports), ["c", "b", "A"]);
        order("nonsense", "sideways").sort(&mut reports);
        assert_eq!(titles(&reports), ["A", "b", "c"]);
    }

    #[test]
    fn header_of_the_sorted_column_flips_the_direction() {
        let current = order("price", "asc");
        assert_eq!(current.link(ReportColumn::Price), "?sort=price&dir=desc");
        assert_eq!(current.link(ReportColumn::Title), "?sort=title&dir=asc");
        assert_eq!(
            order("price", "desc").link(ReportColumn::Price),
            "?sort=price&dir=asc"
        );
    }

    fn totals_of(reports: &[BookReport]) -> Totals {
        Totals::from(ReportTotals {
            books: reports.len() as u64,
            price_sum: reports.iter().map(|report| report.price.amount()).sum(),
            last_change: reports.iter().map(|report| report.updated_at).max(),
        })
    }

    #[test]
    fn totals_count_sum_and_average_exactly() {
        let reports = vec![
            report("a", "x", "0.10", None),
            report("b", "x", "0.20", None),
            report("c", "x", "0.05", None),
        ];
        let totals = totals_of(&reports);
        assert_eq!(totals.books, 3);
        assert_eq!(format!("{:.2}", totals.sum), "0.35");
        assert_eq!(format!("{:.2}", totals.average.unwrap()), "0.12");
        assert_eq!(totals_of(&[]).average, None);
        assert_eq!(Price::ZERO.to_string(), "0.00");
    }

    #[test]
    fn a_page_of_fewer_rows_than_books_says_so_and_totals_every_book() {
        let reports = vec![report("a", "x", "1.00", None)];
        let totals = Totals::from(ReportTotals {
            books: 1234,
            price_sum: "5000.00".parse().unwrap(),
            last_change: None,
        });
        let html = render_report(&reports, &totals, SortOrder::default());
        assert!(html.contains("Showing the first 1 of 1234 books"), "{html}");
        assert!(html.contains("<b id=\"total-books\">1234</b>"));
        assert!(html.contains("<b id=\"average-price\">4.05</b>"));
        let all = render_report(&reports, &totals_of(&reports), SortOrder::default());
        assert!(!all.contains("Showing the first"), "{all}");
    }

    #[test]
    fn page_shows_escaped_rows_sort_links_and_refreshes() {
        let reports = vec![report(
            "<script>alert(1)</script>",
            "O'Brien & Co",
            "12.50",
            None,
        )];
        let html = render_report(&reports, &totals_of(&reports), SortOrder::default());
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!html.contains("<script>"));
        assert!(html.contains("O&#39;Brien &amp; Co"));
        assert!(html.contains("href=\"?sort=price&amp;dir=asc\""));
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"5\">"));
        assert!(html.contains("<b id=\"average-price\">12.50</b>"));
    }
}
