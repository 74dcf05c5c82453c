//! `bookstore report`: the BookReport read model as a table or a JSON array.

use anyhow::Result;
use bookstore::cli::ReportArgs;
use bookstore::config::StoreConfig;
use bookstore::projection::ReportStore;

pub async fn run(config: &StoreConfig, args: ReportArgs) -> Result<()> {
    let store = crate::open_store(config).await?;
    let rows = store.list_reports().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<36}  {:>10}  {:>7}  {:<13}  TITLE — AUTHOR",
        "BOOK ID", "PRICE", "VERSION", "ISBN"
    );
    for row in &rows {
        println!(
            "{:<36}  {:>10}  {:>7}  {:<13}  {} — {}",
            row.book_id,
            row.price,
            row.version,
            row.isbn.as_deref().unwrap_or("-"),
            row.title,
            row.author
        );
    }
    eprintln!("{} book(s)", rows.len());
    Ok(())
}
