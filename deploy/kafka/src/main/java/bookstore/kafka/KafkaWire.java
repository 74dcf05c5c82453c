package bookstore.kafka;

import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.nio.ByteBuffer;
import java.nio.channels.Channels;
import java.util.function.Function;
import org.apache.kafka.common.message.InitProducerIdRequestData;
import org.apache.kafka.common.protocol.Errors;
import org.apache.kafka.common.requests.AbstractRequest;
import org.apache.kafka.common.requests.AbstractResponse;
import org.apache.kafka.common.requests.InitProducerIdRequest;
import org.apache.kafka.common.requests.InitProducerIdResponse;
import org.apache.kafka.common.requests.RequestHeader;

/**
 * One plaintext connection to one broker that sends a request and reads its response, one at a
 * time, with Kafka's own request and response classes.
 *
 * <p>Why by hand: ending a hanging transaction as committed takes an {@code AddPartitionsToTxn}
 * without records, and the tests' hanging transaction takes a transactional {@code Produce}
 * without {@code AddPartitionsToTxn}. Neither the producer nor the admin client offers either
 * (they are exactly what those clients exist to prevent), and their network layer is internal.
 * The local broker has no TLS or SASL, so a socket is all it needs.
 */
final class KafkaWire implements AutoCloseable {
  private static final String CLIENT_ID = "bookstore-kafka-tools";
  private static final int TIMEOUT_MS = 30_000;

  private final Socket socket;
  private final DataInputStream in;
  private final DataOutputStream out;
  private int correlationId;

  private KafkaWire(Socket socket) throws IOException {
    this.socket = socket;
    this.in = new DataInputStream(socket.getInputStream());
    this.out = new DataOutputStream(socket.getOutputStream());
  }

  static KafkaWire connect(String host, int port) throws IOException {
    Socket socket = new Socket();
    socket.connect(new InetSocketAddress(host, port), TIMEOUT_MS);
    socket.setSoTimeout(TIMEOUT_MS);
    return new KafkaWire(socket);
  }

  /** Sends {@code request} and returns the broker's response to it. */
  @SuppressWarnings("unchecked")
  <R extends AbstractResponse> R send(AbstractRequest request) throws IOException {
    RequestHeader header =
        new RequestHeader(request.apiKey(), request.version(), CLIENT_ID, ++correlationId);
    ByteBuffer frame = request.serializeWithHeader(header);
    out.writeInt(frame.remaining());
    Channels.newChannel(out).write(frame);
    out.flush();
    byte[] response = new byte[in.readInt()];
    in.readFully(response);
    return (R) AbstractResponse.parseResponse(ByteBuffer.wrap(response), header);
  }

  /**
   * Takes {@code transactionalId}'s producer id at its next epoch ({@code InitProducerId}, the
   * version of before transaction version 2), which fences whoever used the id before.
   */
  InitProducerIdResponse initProducerId(String transactionalId, int transactionTimeoutMs)
      throws Exception {
    return retryWhileBusy(
        () ->
            send(
                new InitProducerIdRequest.Builder(
                        new InitProducerIdRequestData()
                            .setTransactionalId(transactionalId)
                            .setTransactionTimeoutMs(transactionTimeoutMs)
                            .setProducerId(-1)
                            .setProducerEpoch((short) -1))
                    .build((short) 4)),
        InitProducerIdResponse::error);
  }

  interface Request<R> {
    R send() throws Exception;
  }

  /**
   * Sends again while the coordinator is busy: loading, ending an earlier transaction, or not
   * yet taking over. The last happens on a fresh cluster: the first FindCoordinator creates the
   * transaction state topic and names its leader as coordinator, which answers NOT_COORDINATOR
   * until it has become leader of that partition (seen once in CI). The tools talk to one
   * broker, so asking it again is right; a wrong broker would answer so until the deadline.
   */
  static <R> R retryWhileBusy(Request<R> request, Function<R, Errors> error)
      throws Exception {
    long deadline = System.currentTimeMillis() + TIMEOUT_MS;
    while (true) {
      R response = request.send();
      Errors code = error.apply(response);
      boolean busy =
          code == Errors.CONCURRENT_TRANSACTIONS
              || code == Errors.COORDINATOR_LOAD_IN_PROGRESS
              || code == Errors.COORDINATOR_NOT_AVAILABLE
              || code == Errors.NOT_COORDINATOR;
      if (!busy || System.currentTimeMillis() > deadline) {
        return response;
      }
      Thread.sleep(100);
    }
  }

  @Override
  public void close() throws IOException {
    socket.close();
  }
}
