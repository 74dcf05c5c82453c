package bookstore.kafka;

import java.nio.charset.StandardCharsets;
import java.util.Collection;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AlterConfigOp;
import org.apache.kafka.clients.admin.ConfigEntry;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.common.Node;
import org.apache.kafka.common.compress.Compression;
import org.apache.kafka.common.config.ConfigResource;
import org.apache.kafka.common.message.FindCoordinatorRequestData;
import org.apache.kafka.common.message.ProduceRequestData;
import org.apache.kafka.common.message.ProduceResponseData;
import org.apache.kafka.common.protocol.Errors;
import org.apache.kafka.common.record.internal.MemoryRecords;
import org.apache.kafka.common.record.internal.SimpleRecord;
import org.apache.kafka.common.requests.FindCoordinatorRequest;
import org.apache.kafka.common.requests.FindCoordinatorResponse;
import org.apache.kafka.common.requests.InitProducerIdResponse;
import org.apache.kafka.common.requests.ProduceRequest;
import org.apache.kafka.common.requests.ProduceResponse;

/**
 * For tests of the hanging-transaction tools: leaves a transaction open on one partition that its
 * coordinator knows nothing of, which is the state a lost commit or abort marker leaves behind.
 *
 * <p>How: turns the cluster's {@code transaction.partition.verification.enable} off (it exists to
 * refuse exactly this), takes a producer id for the transactional id, writes one transactional
 * record straight to the partition's leader without {@code AddPartitionsToTxn}, and turns the
 * verification back on. Every {@code read_committed} reader of the partition then stops at that
 * record until a marker of that producer id ends it. One-broker clusters only: the producer id
 * is asked of the partition's leader, which must also be the transaction coordinator.
 *
 * <p>Usage: {@code OrphanTransaction <bootstrap> <topic> <partition> <transactional-id> <value>};
 * the record is keyed by the transactional id (a compacted topic refuses records without a key);
 * prints {@code orphan: <topic>-<partition> producer <id> epoch <epoch> at offset <offset>}.
 */
public final class OrphanTransaction {
  private static final int TIMEOUT_MS = 15_000;
  private static final String VERIFICATION = "transaction.partition.verification.enable";

  public static void main(String[] args) throws Exception {
    if (args.length != 5) {
      System.err.println(
          "usage: OrphanTransaction <bootstrap-servers> <topic> <partition> <transactional-id> <value>");
      System.exit(2);
    }
    String topic = args[1];
    int partition = Integer.parseInt(args[2]);
    String transactionalId = args[3];
    byte[] value = args[4].getBytes(StandardCharsets.UTF_8);
    Properties props = Admins.settings(args[0], "bookstore-orphan-transaction", TIMEOUT_MS);
    try (Admin admin = Admin.create(props)) {
      TopicDescription description =
          admin.describeTopics(Set.of(topic)).allTopicNames().get().get(topic);
      Node leader = description.partitions().get(partition).leader();
      setVerification(admin, leader, false);
      try (KafkaWire wire = KafkaWire.connect(leader.host(), leader.port())) {
        awaitCoordinator(wire, transactionalId);
        InitProducerIdResponse init = wire.initProducerId(transactionalId, TIMEOUT_MS);
        check("InitProducerId", init.error());
        long producerId = init.data().producerId();
        short epoch = init.data().producerEpoch();
        MemoryRecords records =
            MemoryRecords.withTransactionalRecords(
                Compression.NONE,
                producerId,
                epoch,
                0,
                new SimpleRecord(
                    System.currentTimeMillis(),
                    transactionalId.getBytes(StandardCharsets.UTF_8),
                    value));
        ProduceRequestData data =
            new ProduceRequestData()
                .setAcks((short) -1)
                .setTimeoutMs(TIMEOUT_MS)
                .setTransactionalId(transactionalId)
                .setTopicData(
                    new ProduceRequestData.TopicProduceDataCollection(
                        List.of(
                                new ProduceRequestData.TopicProduceData()
                                    .setName(topic)
                                    .setPartitionData(
                                        List.of(
                                            new ProduceRequestData.PartitionProduceData()
                                                .setIndex(partition)
                                                .setRecords(records))))
                            .iterator()));
        // Version 11, the last before transaction version 2: a write of version 12 or later
        // joins its partition to the transaction, which is what this must not do.
        ProduceResponse produced =
            wire.send(ProduceRequest.builder(data, true).build(ProduceRequest.LAST_STABLE_VERSION_BEFORE_TRANSACTION_V2));
        ProduceResponseData.PartitionProduceResponse result =
            produced.data().responses().iterator().next().partitionResponses().get(0);
        check("Produce", Errors.forCode(result.errorCode()));
        System.out.println(
            "orphan: "
                + topic
                + "-"
                + partition
                + " producer "
                + producerId
                + " epoch "
                + epoch
                + " at offset "
                + result.baseOffset());
      } finally {
        setVerification(admin, leader, true);
      }
    }
  }

  /**
   * Waits until the leader is the transactional id's coordinator: the first request of a cluster
   * for a transaction coordinator creates the transaction state topic.
   */
  private static void awaitCoordinator(KafkaWire wire, String transactionalId) throws Exception {
    long deadline = System.currentTimeMillis() + TIMEOUT_MS;
    while (true) {
      FindCoordinatorResponse found =
          wire.send(
              new FindCoordinatorRequest.Builder(
                      new FindCoordinatorRequestData()
                          .setKeyType(FindCoordinatorRequest.CoordinatorType.TRANSACTION.id())
                          .setCoordinatorKeys(List.of(transactionalId)))
                  .build((short) 4));
      Errors error = Errors.forCode(found.data().coordinators().get(0).errorCode());
      if (error == Errors.NONE) {
        return;
      }
      if (System.currentTimeMillis() > deadline) {
        throw new IllegalStateException("FindCoordinator failed: " + error);
      }
      Thread.sleep(200);
    }
  }

  /** Sets the cluster-wide verification (or removes the override) and waits until it holds. */
  private static void setVerification(Admin admin, Node broker, boolean enabled)
      throws Exception {
    ConfigResource cluster = new ConfigResource(ConfigResource.Type.BROKER, "");
    AlterConfigOp op =
        enabled
            ? new AlterConfigOp(new ConfigEntry(VERIFICATION, ""), AlterConfigOp.OpType.DELETE)
            : new AlterConfigOp(
                new ConfigEntry(VERIFICATION, "false"), AlterConfigOp.OpType.SET);
    Map<ConfigResource, Collection<AlterConfigOp>> change = Map.of(cluster, List.of(op));
    admin.incrementalAlterConfigs(change).all().get();
    ConfigResource self = new ConfigResource(ConfigResource.Type.BROKER, broker.idString());
    long deadline = System.currentTimeMillis() + TIMEOUT_MS;
    while (true) {
      String value =
          admin.describeConfigs(Set.of(self)).all().get().get(self).get(VERIFICATION).value();
      if (Boolean.parseBoolean(value) == enabled) {
        return;
      }
      if (System.currentTimeMillis() > deadline) {
        throw new IllegalStateException(VERIFICATION + " did not become " + enabled);
      }
      Thread.sleep(100);
    }
  }

  private static void check(String request, Errors error) {
    if (error != Errors.NONE) {
      throw new IllegalStateException(request + " failed: " + error);
    }
  }
}
