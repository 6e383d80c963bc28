package client

// Abort drops the connection without a close frame, as a crashed peer or a cut network
// would: the broker sees a non-clean close and keeps the presence in its reconnect grace.
func (c *Client) Abort() {
	c.closeOnce.Do(func() {
		c.closedByUs.Store(true)
		close(c.closing)
		_ = c.conn.Close()
	})
	<-c.done
}
