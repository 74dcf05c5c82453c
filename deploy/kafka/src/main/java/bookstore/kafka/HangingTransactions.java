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
import org.apache.kafka.clients.admin.ListTopicsOptions;
import org.apache.kafka.clients.admin.ListTransactionsOptions;
import org.apache.kafka.clients.admin.DescribeProducersResult.PartitionProducerState;
import org.apache.kafka.clients.admin.ProducerState;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.clients.admin.TransactionDescription;
import org.apache.kafka.clients.admin.TransactionListing;
import org.apache.kafka.clients.admin.TransactionState;
import org.apache.kafka.common.Node;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.message.EndTxnRequestData;
import org.apache.kafka.common.protocol.Errors;
import org.apache.kafka.common.requests.AddPartitionsToTxnRequest;
import org.apache.kafka.common.requests.AddPartitionsToTxnResponse;
import org.apache.kafka.common.requests.EndTxnRequest;
import org.apache.kafka.common.requests.EndTxnResponse;
import org.apache.kafka.common.requests.InitProducerIdResponse;

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
 *
 * <p>Two ways to end one, and which is right depends on whether its producer committed it:
 *
 * <ul>
 *   <li>{@code --abort} / {@code --abort-producer <id>} write the abort marker the coordinator
 *       failed to write, the way Kafka's own {@code kafka-transactions.sh abort} does. Right for a
 *       transaction that was never committed: its records were never visible to {@code
 *       read_committed} readers. Aborting one whose commit Kafka had accepted hides its records
 *       for good.
 *   <li>{@code --commit-producer <id>} ends that producer's hanging transactions as committed.
 *       Right for one whose commit Kafka accepted and whose commit markers it never wrote (Kafka
 *       4.4.0 has been seen to do this, see the README). There is no admin call for it, so it
 *       takes the producer's transactional id (fencing whoever uses it: stop that relay first),
 *       adds the hanging partitions to a new, empty transaction of the same producer id, and
 *       commits it. A commit marker ends whatever that producer id has open on the partition, so
 *       the hanging records become visible before the (empty) new transaction's. See {@link
 *       #commit}.
 * </ul>
 *
 * <p>This is the operator's tool of the local broker; brokers elsewhere have {@code
 * kafka-transactions.sh find-hanging} and {@code abort}.
 *
 * <p>Usage: {@code HangingTransactions <bootstrap> <min-age-ms> [--abort | --abort-producer <id> |
 * --commit-producer <id>]}. Prints one line per hanging transaction, one per transaction ended,
 * and a summary. Exits 0 unless the cluster could not be asked, 3 if a commit could not be made.
 */
public final class HangingTransactions {
  private static final int TIMEOUT_MS = 15_000;

  public static void main(String[] args) throws Exception {
    boolean valid =
        args.length == 2
            || (args.length == 3 && args[2].equals("--abort"))
            || (args.length == 4
                && (args[2].equals("--abort-producer") || args[2].equals("--commit-producer")));
    if (!valid) {
      System.err.println(
          "usage: HangingTransactions <bootstrap-servers> <min-age-ms>"
              + " [--abort | --abort-producer <id> | --commit-producer <id>]");
      System.exit(2);
    }
    long minAgeMs = Long.parseLong(args[1]);
    String mode = args.length >= 3 ? args[2] : "";
    Long onlyProducer = args.length == 4 ? Long.parseLong(args[3]) : null;
    Properties props = Admins.settings(args[0], "bookstore-hanging-transactions", TIMEOUT_MS);
    try (Admin admin = Admin.create(props)) {
      List<AbortTransactionSpec> hanging = find(admin, minAgeMs);
      if (mode.equals("--commit-producer")) {
        int committed = commit(admin, hanging, onlyProducer);
        System.out.println(hanging.size() + " hanging transaction(s), " + committed + " committed");
        if (committed == 0 && hanging.stream().anyMatch(s -> s.producerId() == onlyProducer)) {
          System.exit(3);
        }
        return;
      }
      boolean abort = !mode.isEmpty();
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

  /**
   * Ends the hanging transactions of {@code producerId} as committed; returns how many partitions
   * it ended.
   *
   * <p>How: the coordinator writes a transaction's markers to the partitions added to it, and a
   * partition ends whatever the marker's producer id has open there, at any older epoch (it only
   * refuses an older epoch than the one it knows). So: {@code InitProducerId} for the producer's
   * transactional id (the coordinator gives the same producer id the next epoch, which fences
   * its current user), {@code AddPartitionsToTxn} with the hanging partitions, and {@code
   * EndTxn(commit)}. The client-side versions of the requests from before transaction version
   * 2 are used: with those, partitions join a transaction only through {@code
   * AddPartitionsToTxn}, never implicitly with a write.
   */
  private static int commit(Admin admin, List<AbortTransactionSpec> hanging, long producerId)
      throws Exception {
    List<AbortTransactionSpec> specs = new ArrayList<>();
    for (AbortTransactionSpec spec : hanging) {
      if (spec.producerId() == producerId && stillOpen(admin, spec)) {
        specs.add(spec);
      }
    }
    if (specs.isEmpty()) {
      System.out.println("no hanging transaction of producer " + producerId + " to commit");
      return 0;
    }
    Collection<TransactionListing> listings =
        admin
            .listTransactions(new ListTransactionsOptions().filterProducerIds(Set.of(producerId)))
            .all()
            .get();
    if (listings.size() != 1) {
      System.out.println(
          "could not commit: "
              + listings.size()
              + " transactional ids have producer id "
              + producerId
              + ", one was expected");
      return 0;
    }
    String transactionalId = listings.iterator().next().transactionalId();
    TransactionDescription description =
        admin.describeTransactions(Set.of(transactionalId)).all().get().get(transactionalId);
    Node coordinator =
        admin.describeCluster().nodes().get().stream()
            .filter(node -> node.id() == description.coordinatorId())
            .findFirst()
            .orElseThrow(() -> new IllegalStateException("coordinator not in the cluster"));
    List<TopicPartition> partitions =
        specs.stream().map(AbortTransactionSpec::topicPartition).distinct().toList();
    try (KafkaWire wire = KafkaWire.connect(coordinator.host(), coordinator.port())) {
      InitProducerIdResponse init = wire.initProducerId(transactionalId, TIMEOUT_MS);
      if (init.error() != Errors.NONE) {
        System.out.println("could not commit: InitProducerId failed: " + init.error());
        return 0;
      }
      if (init.data().producerId() != producerId) {
        System.out.println(
            "could not commit: transactional id "
                + transactionalId
                + " now has producer id "
                + init.data().producerId());
        return 0;
      }
      short epoch = init.data().producerEpoch();
      AddPartitionsToTxnResponse added =
          KafkaWire.retryWhileBusy(
              () ->
                  wire.send(
                      AddPartitionsToTxnRequest.Builder.forClient(
                              transactionalId, producerId, epoch, partitions)
                          .build((short) 3)),
              response -> worst(response.errors().get(AddPartitionsToTxnResponse.V3_AND_BELOW_TXN_ID)));
      Errors addError = worst(added.errors().get(AddPartitionsToTxnResponse.V3_AND_BELOW_TXN_ID));
      if (addError != Errors.NONE) {
        System.out.println("could not commit: AddPartitionsToTxn failed: " + added.errors());
        return 0;
      }
      EndTxnResponse ended =
          KafkaWire.retryWhileBusy(
              () ->
                  wire.send(
                      new EndTxnRequest.Builder(
                              new EndTxnRequestData()
                                  .setTransactionalId(transactionalId)
                                  .setProducerId(producerId)
                                  .setProducerEpoch(epoch)
                                  .setCommitted(true),
                              false)
                          .build((short) 4)),
              EndTxnResponse::error);
      if (ended.error() != Errors.NONE) {
        System.out.println("could not commit: EndTxn failed: " + ended.error());
        return 0;
      }
    }
    // The coordinator answers EndTxn before it has written the markers.
    int committed = 0;
    long deadline = System.currentTimeMillis() + TIMEOUT_MS;
    for (AbortTransactionSpec spec : specs) {
      while (stillOpen(admin, spec) && System.currentTimeMillis() < deadline) {
        Thread.sleep(200);
      }
      if (stillOpen(admin, spec)) {
        System.out.println("could not commit " + describe(spec) + ": still open");
      } else {
        System.out.println("committed " + describe(spec) + " (transactional id " + transactionalId + ")");
        committed++;
      }
    }
    return committed;
  }

  /** The first error among the partitions' results, {@code NONE} if none. */
  private static Errors worst(Map<TopicPartition, Errors> errors) {
    if (errors == null) {
      return Errors.UNKNOWN_SERVER_ERROR;
    }
    return errors.values().stream().filter(e -> e != Errors.NONE).findFirst().orElse(Errors.NONE);
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
