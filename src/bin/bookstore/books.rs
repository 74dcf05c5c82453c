//! `bookstore books …`: commands against the local store.

use anyhow::{Context, Result};
use bookstore::cli::{AddArgs, BooksCommand, UpdateArgs};
use bookstore::codec::AvroCodec;
use bookstore::config::StoreConfig;
use bookstore::domain::{AddBook, Book, BookCommand, BookId, Price, UpdateDetails};
use bookstore::service::{BookService, CommandContext};
use bookstore::store::{AnyStore, EventStore};

pub async fn open(config: &StoreConfig) -> Result<BookService<AnyStore, AvroCodec>> {
    let store = crate::open_store(config).await?;
    Ok(BookService::new(store, AvroCodec::new()))
}

pub async fn run(config: &StoreConfig, command: BooksCommand) -> Result<()> {
    let service = open(config).await?;
    match command {
        BooksCommand::Add(args) => {
            let command = add_command(args)?;
            let outcome = service.execute(command, CommandContext::default()).await?;
            println!("{}", outcome.book_id);
        }
        BooksCommand::UpdatePrice(args) => {
            let command = BookCommand::UpdatePrice {
                book_id: args.id.parse()?,
                price: args.price.parse()?,
            };
            report_change(service.execute(command, CommandContext::default()).await?);
        }
        BooksCommand::Update(args) => {
            let command = BookCommand::UpdateDetails(update_command(args)?);
            report_change(service.execute(command, CommandContext::default()).await?);
        }
        BooksCommand::Remove(args) => {
            let command = BookCommand::Remove {
                book_id: args.id.parse()?,
            };
            report_change(service.execute(command, CommandContext::default()).await?);
        }
        BooksCommand::Show(args) => {
            let book_id: BookId = args.id.parse()?;
            let book = service
                .store()
                .load_book(book_id)
                .await?
                .with_context(|| format!("book {book_id} does not exist"))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&book)?);
            } else {
                print_book(&book);
            }
        }
        BooksCommand::List(args) => {
            let books = service.store().list_books().await?;
            for book in &books {
                if args.json {
                    println!("{}", serde_json::to_string(book)?);
                } else {
                    println!(
                        "{}  {:>10}  v{:<3} {} — {}",
                        book.book_id, book.price, book.version, book.title, book.author
                    );
                }
            }
        }
    }
    Ok(())
}

fn add_command(args: AddArgs) -> Result<BookCommand> {
    let book_id = match args.id {
        Some(id) => id.parse()?,
        None => BookId::generate(),
    };
    let price: Price = args.price.parse()?;
    Ok(BookCommand::Add(AddBook {
        book_id,
        title: args.title,
        author: args.author,
        isbn: args.isbn,
        price,
        description: args.description,
    }))
}

fn update_command(args: UpdateArgs) -> Result<UpdateDetails> {
    let mut update = UpdateDetails::new(args.id.parse()?);
    update.title = args.title;
    update.author = args.author;
    // An empty text clears an optional field; the domain treats empty as absent.
    update.isbn = args.isbn.map(Some);
    update.description = args.description.map(Some);
    Ok(update)
}

fn report_change(outcome: bookstore::service::CommandOutcome) {
    if outcome.events.is_empty() {
        println!("unchanged: {}", outcome.book_id);
        return;
    }
    let version = outcome.state.map(|book| book.version).unwrap_or_default();
    let types: Vec<&str> = outcome
        .events
        .iter()
        .map(|event| event.metadata.event_type.as_str())
        .collect();
    println!(
        "{} now at version {version} ({})",
        outcome.book_id,
        types.join(", ")
    );
}

fn print_book(book: &Book) {
    println!("id:          {}", book.book_id);
    println!("title:       {}", book.title);
    println!("author:      {}", book.author);
    println!("isbn:        {}", book.isbn.as_deref().unwrap_or("-"));
    println!("price:       {}", book.price);
    println!(
        "description: {}",
        book.description.as_deref().unwrap_or("-")
    );
    println!("version:     {}", book.version);
    if book.removed {
        println!("removed:     yes");
    }
}
