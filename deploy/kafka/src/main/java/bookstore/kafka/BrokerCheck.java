package bookstore.kafka;

import java.util.Collection;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.DescribeClusterOptions;
import org.apache.kafka.clients.admin.DescribeClusterResult;
import org.apache.kafka.common.Node;

/**
 * Readiness probe used by kafka.sh: exits 0 when a broker at the given bootstrap address answers
 * a metadata (describeCluster) request within the timeout, 1 otherwise.
 *
 * <p>Usage: {@code BrokerCheck <bootstrap> [timeoutMs]}
 */
public final class BrokerCheck {
  public static void main(String[] args) {
    if (args.length < 1 || args.length > 2) {
      System.err.println("usage: BrokerCheck <bootstrap-servers> [timeout-ms]");
      System.exit(2);
    }
    int timeoutMs = args.length == 2 ? Integer.parseInt(args[1]) : 3000;
    Properties props = Admins.settings(args[0], "bookstore-broker-check", timeoutMs);
    props.put(AdminClientConfig.RECONNECT_BACKOFF_MAX_MS_CONFIG, 500);
    int status = 1;
    try (Admin admin = Admin.create(props)) {
      DescribeClusterResult cluster =
          admin.describeCluster(new DescribeClusterOptions().timeoutMs(timeoutMs));
      String clusterId = cluster.clusterId().get(timeoutMs, TimeUnit.MILLISECONDS);
      Collection<Node> nodes = cluster.nodes().get(timeoutMs, TimeUnit.MILLISECONDS);
      Node controller = cluster.controller().get(timeoutMs, TimeUnit.MILLISECONDS);
      if (!nodes.isEmpty()) {
        System.out.println(
            "cluster " + clusterId + ", " + nodes.size() + " broker(s), controller " + controller);
        status = 0;
      }
    } catch (Exception e) {
      Throwable cause = e.getCause() != null ? e.getCause() : e;
      System.err.println("no broker at " + args[0] + ": " + cause);
    }
    System.exit(status);
  }
}
