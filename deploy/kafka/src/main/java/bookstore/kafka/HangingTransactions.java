package bookstore.kafka;

import java.util.ArrayList;
import java.util.Collection;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.AbortTransactionSpec;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.ListTopicsOptions;
import org.apache.kafka.clients.admin.ListTransactionsOptions;
import org.apache.kafka.clients.admin.DescribeProducersResult.PartitionProducerState;
import org.apache.kafka.clients.admin.ProducerState;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.clients.admin.TransactionDescription;
import org.apache.kafka.clients.admin.TransactionListing;
import org.apache.kafka.clients.admin.TransactionState;
import org.apache.kafka.common.TopicPartition;

/**
 * Finds, and with {@code --abort} aborts, hanging transactions: a transaction open on a partition
 * that its coordinator no longer counts as open there, so no commit or abort marker will ever
 * end it. Every {@code read_committed} reader of the partition stops at its first record, and
 * the relay cannot read its checkpoint behind it (see the README, "Hanging transactions").
 *
 * <p>The rule: a producer with a transaction open on a partition, whose last write there is older
 * than the minimum age, and whose coordinator has no transaction of that producer id in progress
 * (or one that does not include the partition). A transaction the coordinator still holds open
 * is never touched: the coordinator ends it itself, at the latest by its transaction timeout.
 * Aborting writes the abort marker the coordinator failed to write, the way Kafka's own {@code
 * kafka-transactions.sh abort} does; its records were never visible to {@code read_committed}
 * readers.
 *
 * <p>This is the operator's tool of the local broker; brokers elsewhere have {@code
 * kafka-transactions.sh find-hanging} and {@code abort}.
 *
 * <p>Aborting is safe only for a transaction that was never committed: Kafka 4.4.0 has also been
 * seen to leave a transaction hanging whose commit it had accepted (its commit markers never
 * written), and aborting that one hides its records for good. See the README.
 *
 * <p>Usage: {@code HangingTransactions <bootstrap> <min-age-ms> [--abort | --abort-producer
 * <id>]}. Prints one line per hanging transaction and a summary; with {@code --abort} aborts
 * every one, with {@code --abort-producer} only those of that producer id. Exits 0 unless the
 * cluster could not be asked.
 */
public final class HangingTransactions {
  private static final int TIMEOUT_MS = 15_000;

  public static void main(String[] args) throws Exception {
    boolean valid =
        args.length == 2
            || (args.length == 3 && args[2].equals("--abort"))
            || (args.length == 4 && args[2].equals("--abort-producer"));
    if (!valid) {
      System.err.println(
          "usage: HangingTransactions <bootstrap-servers> <min-age-ms>"
              + " [--abort | --abort-producer <id>]");
      System.exit(2);
    }
    long minAgeMs = Long.parseLong(args[1]);
    boolean abort = args.length >= 3;
    Long onlyProducer = args.length == 4 ? Long.parseLong(args[3]) : null;
    Properties props = new Properties();
    props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
    props.put(AdminClientConfig.CLIENT_ID_CONFIG, "bookstore-hanging-transactions");
    props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, TIMEOUT_MS);
    props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, TIMEOUT_MS);
    try (Admin admin = Admin.create(props)) {
      List<AbortTransactionSpec> hanging = find(admin, minAgeMs);
      int aborted = 0;
      for (AbortTransactionSpec spec : abort ? hanging : List.<AbortTransactionSpec>of()) {
        if (onlyProducer != null && spec.producerId() != onlyProducer) {
          continue;
        }
        // The coordinator may have ended it after all between the two looks (it writes its
        // markers before it lists the transaction as complete), so look at the partition again.
        if (!stillOpen(admin, spec)) {
          System.out.println("ended meanwhile " + describe(spec));
          continue;
        }
        try {
          admin.abortTransaction(spec).all().get(TIMEOUT_MS, TimeUnit.MILLISECONDS);
          System.out.println("aborted " + describe(spec));
          aborted++;
        } catch (Exception e) {
          Throwable cause = e.getCause() != null ? e.getCause() : e;
          System.out.println("could not abort " + describe(spec) + ": " + cause);
        }
      }
      System.out.println(
          hanging.size() + " hanging transaction(s)" + (abort ? ", " + aborted + " aborted" : ""));
    } catch (Exception e) {
      Throwable cause = e.getCause() != null ? e.getCause() : e;
      System.err.println("could not look for hanging transactions at " + args[0] + ": " + cause);
      System.exit(1);
    }
  }

  private static List<AbortTransactionSpec> find(Admin admin, long minAgeMs) throws Exception {
    Set<String> topics =
        admin.listTopics(new ListTopicsOptions().listInternal(false)).names().get();
    Map<String, TopicDescription> descriptions =
        admin.describeTopics(topics).allTopicNames().get();
    List<TopicPartition> partitions = new ArrayList<>();
    descriptions.forEach(
        (topic, description) ->
            description.partitions().forEach(p -> partitions.add(new TopicPartition(topic, p.partition()))));
    Map<TopicPartition, PartitionProducerState> producers =
        admin.describeProducers(partitions).all().get();
    long now = System.currentTimeMillis();
    List<AbortTransactionSpec> hanging = new ArrayList<>();
    for (Map.Entry<TopicPartition, PartitionProducerState> entry : producers.entrySet()) {
      TopicPartition partition = entry.getKey();
      for (ProducerState producer : entry.getValue().activeProducers()) {
        if (producer.currentTransactionStartOffset().isEmpty()
            || now - producer.lastTimestamp() < minAgeMs) {
          continue;
        }
        String coordinator = coordinatorView(admin, producer.producerId(), partition);
        if (coordinator == null) {
          continue;
        }
        AbortTransactionSpec spec =
            new AbortTransactionSpec(
                partition,
                producer.producerId(),
                (short) producer.producerEpoch(),
                producer.coordinatorEpoch().orElse(-1));
        System.out.println(
            "hanging: "
                + describe(spec)
                + ", open since offset "
                + producer.currentTransactionStartOffset().getAsLong()
                + ", last write "
                + (now - producer.lastTimestamp()) / 1000
                + " s ago; coordinator: "
                + coordinator);
        hanging.add(spec);
      }
    }
    return hanging;
  }

  /**
   * What the coordinator says of the producer's transaction when it does not hold it open on
   * {@code partition} (so it is hanging there), {@code null} when it does.
   */
  private static String coordinatorView(Admin admin, long producerId, TopicPartition partition)
      throws Exception {
    Collection<TransactionListing> listings =
        admin
            .listTransactions(new ListTransactionsOptions().filterProducerIds(Set.of(producerId)))
            .all()
            .get();
    if (listings.isEmpty()) {
      return "no transactional id has producer id " + producerId;
    }
    for (TransactionListing listing : listings) {
      TransactionDescription description =
          admin
              .describeTransactions(Set.of(listing.transactionalId()))
              .all()
              .get()
              .get(listing.transactionalId());
      TransactionState state = description.state();
      boolean ending =
          state == TransactionState.PREPARE_COMMIT || state == TransactionState.PREPARE_ABORT;
      boolean open =
          state == TransactionState.ONGOING && description.topicPartitions().contains(partition);
      if (description.producerId() == producerId && (ending || open)) {
        return null;
      }
      return "transactional id "
          + listing.transactionalId()
          + " is "
          + state
          + " at epoch "
          + description.producerEpoch()
          + (state == TransactionState.ONGOING ? " without this partition" : "");
    }
    return null;
  }

  /** Whether the partition still has the transaction of {@code spec} open. */
  private static boolean stillOpen(Admin admin, AbortTransactionSpec spec) throws Exception {
    PartitionProducerState state =
        admin.describeProducers(Set.of(spec.topicPartition())).all().get().get(spec.topicPartition());
    return state.activeProducers().stream()
        .anyMatch(
            producer ->
                producer.producerId() == spec.producerId()
                    && producer.producerEpoch() == spec.producerEpoch()
                    && producer.currentTransactionStartOffset().isPresent());
  }

  private static String describe(AbortTransactionSpec spec) {
    return spec.topicPartition()
        + " producer "
        + spec.producerId()
        + " epoch "
        + spec.producerEpoch();
  }
}
