//! The `Book` aggregate on its own: validation rules, which events each command raises, and the
//! property that the latest fact always states the book as it is.

use bookstore::domain::{
    AddBook, Book, BookCommand, BookEvent, BookFactEvent, BookId, DetailField, DomainError, Price,
    UpdateDetails,
};
use proptest::prelude::*;

fn gatsby(book_id: BookId) -> AddBook {
    AddBook {
        book_id,
        title: "The Great Gatsby".into(),
        author: "F. Scott Fitzgerald".into(),
        isbn: Some("9780743273565".into()),
        price: "12.99".parse().unwrap(),
        description: None,
    }
}

fn added(add: AddBook) -> Book {
    Book::execute(None, &BookCommand::Add(add))
        .unwrap()
        .unwrap()
        .state
}

fn invalid_field(result: Result<impl std::fmt::Debug, DomainError>) -> &'static str {
    match result {
        Err(DomainError::Invalid(error)) => error.field,
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn adding_a_book_raises_book_added_with_every_field_and_a_fact_at_version_1() {
    let book_id = BookId::generate();
    let decision = Book::execute(None, &BookCommand::Add(gatsby(book_id)))
        .unwrap()
        .unwrap();

    let [BookEvent::Added(event)] = decision.events.as_slice() else {
        panic!("expected one BookAdded, got {:?}", decision.events);
    };
    assert_eq!(event.title, "The Great Gatsby");
    assert_eq!(event.author, "F. Scott Fitzgerald");
    assert_eq!(event.isbn.as_deref(), Some("9780743273565"));
    assert_eq!(event.price.to_string(), "12.99");
    assert_eq!(decision.fact.version, 1);
    assert_eq!(decision.fact, BookFactEvent::of(&decision.state));
}

#[test]
fn price_update_carries_old_and_new_price() {
    let book = added(gatsby(BookId::generate()));
    let command = BookCommand::UpdatePrice {
        book_id: book.book_id,
        price: "15.99".parse().unwrap(),
    };

    let decision = Book::execute(Some(&book), &command).unwrap().unwrap();

    let [BookEvent::PriceUpdated(event)] = decision.events.as_slice() else {
        panic!("expected one BookPriceUpdated");
    };
    assert_eq!(event.old_price.to_string(), "12.99");
    assert_eq!(event.new_price.to_string(), "15.99");
    assert_eq!(decision.fact.price.to_string(), "15.99");
    assert_eq!(decision.fact.version, 2);
}

#[test]
fn a_command_that_changes_nothing_raises_no_event_at_all() {
    let book = added(gatsby(BookId::generate()));
    let same_price = BookCommand::UpdatePrice {
        book_id: book.book_id,
        price: book.price,
    };
    let mut same_details = UpdateDetails::new(book.book_id);
    same_details.title = Some("  The Great Gatsby ".into());

    assert_eq!(Book::execute(Some(&book), &same_price).unwrap(), None);
    let details = BookCommand::UpdateDetails(same_details);
    assert_eq!(Book::execute(Some(&book), &details).unwrap(), None);
}

#[test]
fn details_update_lists_exactly_the_changed_fields() {
    let book = added(gatsby(BookId::generate()));
    let mut update = UpdateDetails::new(book.book_id);
    update.title = Some("Gatsby".into());
    update.isbn = Some(None);
    update.author = Some(book.author.clone());

    let decision = Book::execute(Some(&book), &BookCommand::UpdateDetails(update))
        .unwrap()
        .unwrap();

    let [BookEvent::DetailsUpdated(event)] = decision.events.as_slice() else {
        panic!("expected one BookDetailsUpdated");
    };
    assert_eq!(event.changed, vec![DetailField::Title, DetailField::Isbn]);
    assert_eq!(event.title, "Gatsby");
    assert_eq!(event.isbn, None);
    assert_eq!(event.author, book.author);
}

#[test]
fn removal_marks_the_fact_removed_and_later_changes_are_refused() {
    let book = added(gatsby(BookId::generate()));
    let remove = BookCommand::Remove {
        book_id: book.book_id,
    };

    let decision = Book::execute(Some(&book), &remove).unwrap().unwrap();
    assert!(decision.fact.removed);
    assert_eq!(decision.fact.version, 2);

    let removed = decision.state;
    assert_eq!(Book::execute(Some(&removed), &remove).unwrap(), None);
    let update = BookCommand::UpdatePrice {
        book_id: book.book_id,
        price: Price::ZERO,
    };
    assert_eq!(
        Book::execute(Some(&removed), &update),
        Err(DomainError::Removed(book.book_id))
    );
}

#[test]
fn commands_on_missing_or_existing_books_are_refused_with_a_clear_error() {
    let book = added(gatsby(BookId::generate()));
    let again = BookCommand::Add(gatsby(book.book_id));
    assert_eq!(
        Book::execute(Some(&book), &again),
        Err(DomainError::AlreadyExists(book.book_id))
    );
    let missing = BookId::generate();
    let remove = BookCommand::Remove { book_id: missing };
    let error = Book::execute(None, &remove).unwrap_err();
    assert_eq!(error, DomainError::NotFound(missing));
    assert!(error.to_string().contains(&missing.to_string()));
}

#[test]
fn every_validation_rule_names_its_field() {
    let book_id = BookId::generate();
    let with = |change: fn(&mut AddBook)| {
        let mut add = gatsby(book_id);
        change(&mut add);
        Book::execute(None, &BookCommand::Add(add))
    };

    assert_eq!(invalid_field(with(|add| add.title = "   ".into())), "title");
    assert_eq!(
        invalid_field(with(|add| add.title = "x".repeat(201))),
        "title"
    );
    assert!(
        with(|add| add.title = "é".repeat(200)).is_ok(),
        "200 characters, not bytes"
    );
    assert_eq!(
        invalid_field(with(|add| add.author = String::new())),
        "author"
    );
    assert_eq!(
        invalid_field(with(|add| add.author = "x".repeat(151))),
        "author"
    );
    assert!(with(|add| add.author = "x".repeat(150)).is_ok());
    assert_eq!(
        invalid_field(with(|add| add.isbn = Some("x".repeat(14)))),
        "isbn"
    );
    assert!(with(|add| add.isbn = Some("x".repeat(13))).is_ok());
    assert_eq!(
        invalid_field(with(|add| add.description = Some("x".repeat(10_001)))),
        "description"
    );
    assert_eq!(
        invalid_field(with(|add| add.title = "a\u{0}b".into())),
        "title"
    );
    // Line breaks as a browser's textarea sends them (CR LF), or as CR alone, become newlines.
    let crlf = added({
        let mut add = gatsby(book_id);
        add.description = Some("line one\r\nline two\rline three\n\tend".into());
        add
    });
    assert_eq!(
        crlf.description.as_deref(),
        Some("line one\nline two\nline three\n\tend")
    );
    assert!(
        with(|add| add.author = format!("{}\r\n{}", "x".repeat(74), "x".repeat(75))).is_ok(),
        "150 characters once CR LF is one newline"
    );
    // Text that shows nothing is empty, though `trim` keeps it: zero-width space, word joiner,
    // byte-order mark, Hangul filler.
    assert_eq!(
        invalid_field(with(|add| add.title = "\u{200B}".into())),
        "title"
    );
    assert_eq!(
        invalid_field(with(|add| add.author = " \u{2060}\u{FEFF} ".into())),
        "author"
    );
    assert_eq!(
        invalid_field(with(|add| add.title = "\u{3164}".into())),
        "title"
    );
    // Nor does white space between them, which `trim` keeps too, or a blank braille pattern.
    assert_eq!(
        invalid_field(with(|add| add.title = "\u{200B} \u{200B}".into())),
        "title"
    );
    assert_eq!(
        invalid_field(with(|add| add.author = "\u{3164}\u{3000}\u{3164}".into())),
        "author"
    );
    assert_eq!(
        invalid_field(with(|add| add.title = "\u{2800}".into())),
        "title"
    );
    let invisible_isbn = added({
        let mut add = gatsby(book_id);
        add.isbn = Some("\u{200B}".into());
        add
    });
    assert_eq!(
        invisible_isbn.isbn, None,
        "an invisible optional value is absent"
    );
    // Inside visible text they stay: they shape emoji and scripts.
    let heart = "I \u{2764}\u{FE0F} Books";
    assert_eq!(
        added({
            let mut add = gatsby(book_id);
            add.title = heart.into();
            add
        })
        .title,
        heart
    );

    let error = with(|add| add.title = "x".repeat(201)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid book: title must be at most 200 characters"
    );
    assert_eq!("-1".parse::<Price>().unwrap_err().field, "price");
}

// ---- property: any sequence of valid commands keeps the latest fact equal to the state ----

fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-zA-Z0-9 äéß]{{1,{max}}}"))
        .unwrap()
        .prop_filter("not blank", |text| !text.trim().is_empty())
}

fn price() -> impl Strategy<Value = Price> {
    (0i64..10_000_000).prop_map(|cents| Price::from_cents(cents).unwrap())
}

#[derive(Debug, Clone)]
enum Step {
    Price(Price),
    Title(String),
    Author(String),
    Isbn(Option<String>),
    Description(Option<String>),
    Remove,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => price().prop_map(Step::Price),
        2 => text(200).prop_map(Step::Title),
        1 => text(150).prop_map(Step::Author),
        1 => proptest::option::of(text(13)).prop_map(Step::Isbn),
        1 => proptest::option::of(text(300)).prop_map(Step::Description),
        1 => Just(Step::Remove),
    ]
}

fn command(book_id: BookId, step: Step) -> BookCommand {
    let mut update = UpdateDetails::new(book_id);
    match step {
        Step::Price(price) => return BookCommand::UpdatePrice { book_id, price },
        Step::Remove => return BookCommand::Remove { book_id },
        Step::Title(title) => update.title = Some(title),
        Step::Author(author) => update.author = Some(author),
        Step::Isbn(isbn) => update.isbn = Some(isbn),
        Step::Description(description) => update.description = Some(description),
    }
    BookCommand::UpdateDetails(update)
}

/// What the book must be after the steps so far, worked out without the domain's code (the
/// generated text has no characters the domain would change beyond trimming).
#[derive(Debug, Clone)]
struct Expected {
    title: String,
    author: String,
    isbn: Option<String>,
    price: Price,
    description: Option<String>,
    version: u64,
    removed: bool,
}

/// How a step must end.
#[derive(Debug, PartialEq)]
enum Outcome {
    Changed,
    Unchanged,
    RefusedAsRemoved,
}

impl Expected {
    fn take(&mut self, step: &Step) -> Outcome {
        fn set<T: PartialEq>(slot: &mut T, value: T) -> bool {
            let changed = *slot != value;
            *slot = value;
            changed
        }
        let trimmed = |text: &Option<String>| text.as_ref().map(|text| text.trim().to_owned());
        if self.removed {
            // Removing again changes nothing; anything else is refused.
            return match step {
                Step::Remove => Outcome::Unchanged,
                _ => Outcome::RefusedAsRemoved,
            };
        }
        let changed = match step {
            Step::Price(price) => set(&mut self.price, *price),
            Step::Title(title) => set(&mut self.title, title.trim().to_owned()),
            Step::Author(author) => set(&mut self.author, author.trim().to_owned()),
            Step::Isbn(isbn) => set(&mut self.isbn, trimmed(isbn)),
            Step::Description(description) => set(&mut self.description, trimmed(description)),
            Step::Remove => set(&mut self.removed, true),
        };
        if changed {
            self.version += 1;
            Outcome::Changed
        } else {
            Outcome::Unchanged
        }
    }

    /// The one delta event a changing `step` must raise, given the book before it (`self`
    /// already holds the book after it).
    fn assert_event(&self, before: &Expected, step: &Step, events: &[BookEvent]) {
        let [event] = events else {
            panic!("one delta event per command, got {events:?}");
        };
        match (step, event) {
            (Step::Price(_), BookEvent::PriceUpdated(update)) => {
                assert_eq!(
                    (update.old_price, update.new_price),
                    (before.price, self.price)
                );
            }
            (Step::Remove, BookEvent::Removed(removed)) => {
                assert_eq!(
                    (&removed.title, &removed.author),
                    (&before.title, &before.author)
                );
            }
            (_, BookEvent::DetailsUpdated(update)) => {
                let changed: Vec<DetailField> = [
                    (DetailField::Title, before.title != self.title),
                    (DetailField::Author, before.author != self.author),
                    (DetailField::Isbn, before.isbn != self.isbn),
                    (
                        DetailField::Description,
                        before.description != self.description,
                    ),
                ]
                .into_iter()
                .filter_map(|(field, changed)| changed.then_some(field))
                .collect();
                assert_eq!(update.changed, changed);
                assert_eq!(
                    (
                        &update.title,
                        &update.author,
                        &update.isbn,
                        &update.description
                    ),
                    (&self.title, &self.author, &self.isbn, &self.description)
                );
            }
            (step, event) => panic!("{step:?} raised {event:?}"),
        }
    }

    fn assert_is(&self, book_id: BookId, fact: &BookFactEvent) {
        assert_eq!(fact.book_id, book_id);
        assert_eq!(fact.title, self.title);
        assert_eq!(fact.author, self.author);
        assert_eq!(fact.isbn, self.isbn);
        assert_eq!(fact.price, self.price);
        assert_eq!(fact.description, self.description);
        assert_eq!(fact.version, self.version);
        assert_eq!(fact.removed, self.removed);
    }
}

proptest! {
    /// Against a model of the book kept by the test itself: every command changes exactly
    /// what it says (or nothing, or is refused once the book is removed), and the latest fact
    /// states the model, version included.
    #[test]
    fn every_command_changes_the_book_as_a_model_of_it_expects(
        title in text(200),
        author in text(150),
        initial in price(),
        steps in proptest::collection::vec(step(), 0..40),
    ) {
        let book_id = BookId::generate();
        let add = AddBook {
            book_id,
            title: title.clone(),
            author: author.clone(),
            isbn: None,
            price: initial,
            description: None,
        };
        let first = Book::execute(None, &BookCommand::Add(add)).unwrap().unwrap();
        let mut expected = Expected {
            title: title.trim().to_owned(),
            author: author.trim().to_owned(),
            isbn: None,
            price: initial,
            description: None,
            version: 1,
            removed: false,
        };
        expected.assert_is(book_id, &first.fact);
        let mut state = first.state;
        for step in steps {
            let before = expected.clone();
            let outcome = expected.take(&step);
            match Book::execute(Some(&state), &command(book_id, step.clone())) {
                Ok(Some(decision)) => {
                    prop_assert_eq!(outcome, Outcome::Changed);
                    expected.assert_event(&before, &step, &decision.events);
                    expected.assert_is(book_id, &decision.fact);
                    state = decision.state;
                }
                Ok(None) => prop_assert_eq!(outcome, Outcome::Unchanged),
                Err(DomainError::Removed(_)) => {
                    prop_assert_eq!(outcome, Outcome::RefusedAsRemoved);
                }
                Err(other) => prop_assert!(false, "valid command refused: {other}"),
            }
        }
    }

    #[test]
    fn latest_fact_always_equals_the_state(
        title in text(200),
        author in text(150),
        initial in price(),
        steps in proptest::collection::vec(step(), 0..40),
    ) {
        let book_id = BookId::generate();
        let add = AddBook { book_id, title, author, isbn: None, price: initial, description: None };
        let first = Book::execute(None, &BookCommand::Add(add)).unwrap().unwrap();
        let mut state = first.state;
        let mut latest_fact = first.fact;
        let mut delta_count = 1u64;

        for step in steps {
            match Book::execute(Some(&state), &command(book_id, step)) {
                Ok(Some(decision)) => {
                    // Folding the delta events reproduces the decided state.
                    let mut replayed = Some(state.clone());
                    for event in &decision.events {
                        replayed = Book::apply(replayed, event);
                    }
                    prop_assert_eq!(replayed.as_ref(), Some(&decision.state));
                    delta_count += decision.events.len() as u64;
                    state = decision.state;
                    latest_fact = decision.fact;
                }
                Ok(None) => {}
                Err(DomainError::Removed(_)) => prop_assert!(state.removed),
                Err(other) => prop_assert!(false, "valid command refused: {other}"),
            }
            prop_assert_eq!(&latest_fact, &BookFactEvent::of(&state));
            prop_assert_eq!(latest_fact.version, delta_count);
        }
    }
}
