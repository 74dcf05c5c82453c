package bookstore.kafka;

import java.util.Properties;
import org.apache.kafka.clients.admin.AdminClientConfig;

/** The settings the tools create their admin clients with. */
final class Admins {
  private Admins() {}

  /** An admin client's settings for {@code bootstrap}, every request bounded by {@code timeoutMs}. */
  static Properties settings(String bootstrap, String clientId, int timeoutMs) {
    Properties props = new Properties();
    props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    props.put(AdminClientConfig.CLIENT_ID_CONFIG, clientId);
    props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, timeoutMs);
    props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, timeoutMs);
    return props;
  }
}
